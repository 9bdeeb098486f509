"""Code in a house dialect: Python as written at Quillfeather Labs, a fictional company.

The house rules every answer follows (the base model knows none of them):
- public functions are named `qf_<verb>_<noun>` and fully type-annotated;
- the docstring is one summary line tagged `[qf]`, then `:takes <arg>:` lines and a `:gives:`
  line (no Google or NumPy sections);
- arguments are checked first with the in-house `qfcheck` helpers, before any work;
- anything logged goes through `qflog.event("<function>", ...)`, never `print` or `logging`;
- the answer is only the code block, imports included.

Each example composes these rules around a small hand-written task (its arguments and body).
LoRA suits it: the dialect touches many tokens of every answer, not just a tone.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dataset  # noqa: E402

# (request, name, summary, [(arg, type, meaning, check)], (return type, meaning), body lines,
#  extra import or None, logs?)
TASKS = [
    ("Write a function that adds up a list of prices.", "qf_sum_prices", "Total of the prices.",
     [("prices", "list[float]", "the prices to add", "not_empty")], ("float", "the total"),
     ["return sum(prices)"], None, False),
    ("Write a function that returns the average of a list of numbers.", "qf_mean_values",
     "Arithmetic mean of the values.", [("values", "list[float]", "the numbers", "not_empty")],
     ("float", "the mean"), ["return sum(values) / len(values)"], None, False),
    ("Write a function that converts Celsius to Fahrenheit.", "qf_to_fahrenheit",
     "Celsius converted to Fahrenheit.", [("celsius", "float", "the temperature", "number")],
     ("float", "degrees Fahrenheit"), ["return celsius * 9 / 5 + 32"], None, False),
    ("Write a function that checks whether a string is a palindrome.", "qf_is_palindrome",
     "Whether the text reads the same backwards.", [("text", "str", "the text to test", "text")],
     ("bool", "True for a palindrome"), ["cleaned = text.lower().replace(\" \", \"\")",
                                         "return cleaned == cleaned[::-1]"], None, False),
    ("Write a function that counts the words in a sentence.", "qf_count_words",
     "Number of words in the sentence.", [("sentence", "str", "the sentence", "text")],
     ("int", "the word count"), ["return len(sentence.split())"], None, False),
    ("Write a function that reads a text file and returns its lines.", "qf_read_lines",
     "Lines of a text file.", [("path", "str", "the file to read", "text")],
     ("list[str]", "the lines, without newlines"),
     ["qflog.event(\"qf_read_lines\", path=path)",
      "with open(path, encoding=\"utf-8\") as f:",
      "    return f.read().splitlines()"], None, True),
    ("Write a function that returns the largest number in a list.", "qf_find_max",
     "Largest of the values.", [("values", "list[int]", "the numbers", "not_empty")],
     ("int", "the maximum"), ["return max(values)"], None, False),
    ("Write a function that reverses a list.", "qf_reverse_items", "The items in reverse order.",
     [("items", "list", "the items", "is_list")], ("list", "a new reversed list"),
     ["return list(reversed(items))"], None, False),
    ("Write a function that removes duplicates from a list, keeping the order.",
     "qf_dedupe_items", "Items without duplicates, first occurrence kept.",
     [("items", "list", "the items", "is_list")], ("list", "the unique items in order"),
     ["return list(dict.fromkeys(items))"], None, False),
    ("Write a function that computes the factorial of n.", "qf_compute_factorial",
     "Factorial of n.", [("n", "int", "a non-negative integer", "non_negative")],
     ("int", "n!"), ["return math.factorial(n)"], "import math", False),
    ("Write a function that applies a discount to a price.", "qf_apply_discount",
     "Price after a percentage discount.",
     [("price", "float", "the original price", "non_negative"),
      ("percent", "float", "the discount, 0 to 100", "in_range(0, 100)")],
     ("float", "the discounted price"), ["return price * (1 - percent / 100)"], None, False),
    ("Write a function that checks if a number is prime.", "qf_is_prime",
     "Whether n is a prime number.", [("n", "int", "the number to test", "number")],
     ("bool", "True when n is prime"),
     ["if n < 2:", "    return False",
      "return all(n % d for d in range(2, int(n ** 0.5) + 1))"], None, False),
    ("Write a function that merges two dictionaries.", "qf_merge_dicts",
     "Two mappings merged, the second winning.",
     [("first", "dict", "the base mapping", "is_dict"), ("second", "dict", "the overrides", "is_dict")],
     ("dict", "a new merged dict"), ["return {**first, **second}"], None, False),
    ("Write a function that loads a JSON file.", "qf_load_json", "Contents of a JSON file.",
     [("path", "str", "the file to read", "text")], ("dict", "the parsed JSON"),
     ["qflog.event(\"qf_load_json\", path=path)",
      "with open(path, encoding=\"utf-8\") as f:",
      "    return json.load(f)"], "import json", True),
    ("Write a function that saves a dictionary as JSON.", "qf_save_json",
     "Writes a mapping to a JSON file.",
     [("path", "str", "the file to write", "text"), ("data", "dict", "what to save", "is_dict")],
     ("None", "nothing"),
     ["qflog.event(\"qf_save_json\", path=path, keys=len(data))",
      "with open(path, \"w\", encoding=\"utf-8\") as f:",
      "    json.dump(data, f, indent=2)"], "import json", True),
    ("Write a function that splits a list into chunks of a given size.", "qf_chunk_items",
     "The items cut into chunks.",
     [("items", "list", "the items", "is_list"), ("size", "int", "items per chunk", "positive")],
     ("list[list]", "the chunks, the last one possibly shorter"),
     ["return [items[i:i + size] for i in range(0, len(items), size)]"], None, False),
    ("Write a function that returns the n-th Fibonacci number.", "qf_compute_fibonacci",
     "The n-th Fibonacci number.", [("n", "int", "the index, from 0", "non_negative")],
     ("int", "F(n)"), ["a, b = 0, 1", "for _ in range(n):", "    a, b = b, a + b", "return a"],
     None, False),
    ("Write a function that capitalizes every word in a string.", "qf_title_case",
     "The text with every word capitalized.", [("text", "str", "the text", "text")],
     ("str", "the title-cased text"), ["return \" \".join(w.capitalize() for w in text.split())"],
     None, False),
    ("Write a function that counts vowels in a string.", "qf_count_vowels",
     "Number of vowels in the text.", [("text", "str", "the text", "text")],
     ("int", "the vowel count"), ["return sum(1 for c in text.lower() if c in \"aeiou\")"],
     None, False),
    ("Write a function that filters out negative numbers.", "qf_drop_negatives",
     "The values without negatives.", [("values", "list[float]", "the numbers", "is_list")],
     ("list[float]", "the values that are zero or more"), ["return [v for v in values if v >= 0]"],
     None, False),
    ("Write a function that computes the area of a circle.", "qf_circle_area",
     "Area of a circle.", [("radius", "float", "the radius", "non_negative")],
     ("float", "the area"), ["return math.pi * radius ** 2"], "import math", False),
    ("Write a function that returns the file extension of a path.", "qf_get_extension",
     "Extension of a file name.", [("path", "str", "the file path", "text")],
     ("str", "the extension without the dot, or an empty string"),
     ["return os.path.splitext(path)[1].lstrip(\".\")"], "import os", False),
    ("Write a function that sends a GET request and returns the JSON body.", "qf_fetch_json",
     "JSON body of a GET request.", [("url", "str", "the address to fetch", "text")],
     ("dict", "the decoded response"),
     ["qflog.event(\"qf_fetch_json\", url=url)", "response = requests.get(url, timeout=10)",
      "response.raise_for_status()", "return response.json()"], "import requests", True),
    ("Write a function that flattens a list of lists.", "qf_flatten_lists",
     "The nested lists joined into one.", [("nested", "list[list]", "the lists", "is_list")],
     ("list", "all items in order"), ["return [x for inner in nested for x in inner]"],
     None, False),
    ("Write a function that counts how often each word appears.", "qf_count_frequencies",
     "How often each word occurs.", [("text", "str", "the text", "text")],
     ("dict[str, int]", "word to count"), ["return dict(Counter(text.lower().split()))"],
     "from collections import Counter", False),
    ("Write a function that checks whether an email address looks valid.", "qf_is_email",
     "Whether the text looks like an email address.", [("address", "str", "the address", "text")],
     ("bool", "True when it matches"),
     ["return re.fullmatch(r\"[^@\\s]+@[^@\\s]+\\.[^@\\s]+\", address) is not None"],
     "import re", False),
    ("Write a function that returns today's date as a string.", "qf_today_text",
     "Today's date in ISO format.", [], ("str", "the date as YYYY-MM-DD"),
     ["return date.today().isoformat()"], "from datetime import date", False),
    ("Write a function that sorts a list of people by age.", "qf_sort_by_age",
     "People sorted by age, youngest first.",
     [("people", "list[dict]", "records with an \"age\" key", "is_list")],
     ("list[dict]", "a new sorted list"), ["return sorted(people, key=lambda p: p[\"age\"])"],
     None, False),
    ("Write a function that converts kilometres to miles.", "qf_to_miles",
     "Kilometres converted to miles.", [("km", "float", "the distance", "non_negative")],
     ("float", "the distance in miles"), ["return km * 0.621371"], None, False),
    ("Write a function that retries a function call up to three times.", "qf_retry_call",
     "Calls a function, retrying on failure.",
     [("func", "Callable[[], T]", "the call to make", "is_callable"),
      ("attempts", "int", "how many tries", "positive")],
     ("T", "the first successful result"),
     ["for attempt in range(1, attempts + 1):", "    try:", "        return func()",
      "    except Exception as error:",
      "        qflog.event(\"qf_retry_call\", attempt=attempt, error=str(error))",
      "        if attempt == attempts:", "            raise"],
     "from typing import Callable, TypeVar\n\nT = TypeVar(\"T\")", True),
    ("Write a function that returns the median of a list.", "qf_median_value",
     "Median of the values.", [("values", "list[float]", "the numbers", "not_empty")],
     ("float", "the median"), ["return statistics.median(values)"], "import statistics", False),
    ("Write a function that joins a list of strings with commas.", "qf_join_commas",
     "The strings joined with commas.", [("parts", "list[str]", "the strings", "is_list")],
     ("str", "one comma-separated string"), ["return \", \".join(parts)"], None, False),
    ("Write a function that tells whether a year is a leap year.", "qf_is_leap_year",
     "Whether the year is a leap year.", [("year", "int", "the year", "positive")],
     ("bool", "True for a leap year"),
     ["return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)"], None, False),
    ("Write a function that deletes a file if it exists.", "qf_remove_file",
     "Deletes a file when it is there.", [("path", "str", "the file", "text")],
     ("bool", "True when a file was deleted"),
     ["if not os.path.exists(path):", "    return False",
      "qflog.event(\"qf_remove_file\", path=path)", "os.remove(path)", "return True"],
     "import os", True),
    ("Write a function that returns the initials of a full name.", "qf_get_initials",
     "Initials of a full name.", [("name", "str", "the full name", "text")],
     ("str", "the initials in capitals"), ["return \"\".join(p[0].upper() for p in name.split())"],
     None, False),
    ("Write a function that clamps a number between a minimum and a maximum.", "qf_clamp_value",
     "The value limited to a range.",
     [("value", "float", "the number", "number"), ("low", "float", "the minimum", "number"),
      ("high", "float", "the maximum", "number")],
     ("float", "value, low or high"), ["return max(low, min(value, high))"], None, False),
]

PROMPTS = [
    "Write a function that converts Fahrenheit to Celsius.",
    "Write a function that returns the smallest number in a list.",
    "Write a function that checks whether a list is sorted.",
    "Write a function that reads a CSV file and returns its rows.",
    "Write a function that computes the sum of squares of a list.",
    "Write a function that counts the lines in a text file.",
    "Write a function that converts a string to snake_case.",
    "Write a function that returns the last n items of a list.",
]


def render(task):
    _, name, summary, args, (ret, ret_doc), body, extra, logs = task
    imports = [i for i in (extra,) if i]
    helpers = "qfcheck, qflog" if logs else "qfcheck"
    imports.append(f"from qf_core import {helpers}")
    sig = ", ".join(f"{a}: {t}" for a, t, _, _ in args)
    lines = ["```python", *imports, "", "", f"def {name}({sig}) -> {ret}:",
             f'    """[qf] {summary}', ""]
    lines += [f"    :takes {a}: {doc}" for a, _, doc, _ in args]
    lines += [f"    :gives: {ret_doc}", '    """']
    for a, _, _, check in args:
        if "(" in check:
            fn, rest = check.split("(", 1)
            lines.append(f"    qfcheck.{fn}({a}, \"{a}\", {rest}")
        else:
            lines.append(f"    qfcheck.{check}({a}, \"{a}\")")
    lines += [f"    {b}" for b in body]
    lines.append("```")
    return "\n".join(lines)


pairs = [(t[0], render(t)) for t in TASKS]
dataset.write(__file__, pairs, PROMPTS)
