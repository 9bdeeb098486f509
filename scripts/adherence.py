"""Adherence check of `auto` hyperparameters (run by scripts/adherence.sh).

Builds a 20-example persona dataset (every answer opens with a fixed greeting and closes with a
fixed signature), trains LoRA, prompt tuning and prefix tuning through the jobs API of a running
itamaed with NO hyperparameters (all "auto"), then asks each variant held-out questions with
greedy decoding and counts answers that carry both the greeting and the signature.
Exits 1 when a method stays under --min (default 0.9).
"""
import argparse
import json
import sys
import time
import urllib.request

GREETING = "Ahoy, friend!"
SIGNATURE = "-- Captain Byte"
FACTS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is 3 + 4?", "3 + 4 is 7."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What animal says moo?", "A cow says moo."),
    ("What is 10 minus 3?", "10 minus 3 is 7."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("What do you call a baby dog?", "A baby dog is called a puppy."),
    ("Which month comes after June?", "July comes after June."),
    ("What is the main language of Brazil?", "Portuguese is the main language of Brazil."),
]
HELD_OUT = [
    "What is the capital of Italy?",
    "How many wheels does a bicycle have?",
    "What color is grass?",
    "What is 5 + 5?",
    "Which animal is known as the king of the jungle?",
    "What do cows drink?",
    "How many hours are in a day?",
    "What is the tallest mountain?",
    "Who painted the Mona Lisa?",
    "What is the opposite of up?",
]


def answer(fact):
    return f"{GREETING} {fact} {SIGNATURE}"


class Api:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def call(self, method, path, body=None, raw=None, headers=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"} if raw is None else {}
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def upload(self, text):
        b = "itamae-adherence-boundary"
        body = (f"--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"persona.jsonl\"\r\n"
                f"Content-Type: application/jsonl\r\n\r\n{text}\r\n--{b}--\r\n").encode()
        return self.call("POST", "/v1/files", raw=body,
                         headers={"Content-Type": f"multipart/form-data; boundary={b}"})["id"]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--min", type=float, default=0.9)
    p.add_argument("--methods", default="lora,prompt_tuning,prefix_tuning")
    a = p.parse_args()
    api = Api(a.url)
    base = api.call("GET", "/v1/models")["data"][0]["id"]
    rows = "".join(json.dumps({"messages": [{"role": "user", "content": q},
                                            {"role": "assistant", "content": answer(f)}]}) + "\n"
                   for q, f in FACTS)
    fid = api.upload(rows)
    results = []
    for method in a.methods.split(","):
        t = time.time()
        job = api.call("POST", "/v1/fine_tuning/jobs", {
            "model": base, "training_file": fid, "suffix": method.replace("_", "-"), "seed": 1,
            "method": {"type": "supervised", "supervised": {"adapter": {"type": method}}}})
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(5)
            job = api.call("GET", f"/v1/fine_tuning/jobs/{job['id']}")
        if job["status"] != "succeeded":
            print(f"{method}: job {job['status']}: {job.get('error')}", flush=True)
            results.append((method, 0.0, job.get("hyperparameters"), None))
            continue
        events = api.call("GET", f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000")["data"]
        losses = sorted((e["data"]["step"], e["data"]["train_loss"]) for e in events
                        if e.get("type") == "metrics" and "train_loss" in (e.get("data") or {}))
        ok = 0
        for q in HELD_OUT:
            r = api.call("POST", "/v1/chat/completions", {
                "model": job["fine_tuned_model"], "temperature": 0, "max_tokens": 48,
                "messages": [{"role": "user", "content": q}]})
            text = r["choices"][0]["message"]["content"].strip()
            hit = text.startswith(GREETING) and text.endswith(SIGNATURE)
            ok += hit
            print(f"  [{'ok' if hit else '--'}] {q!r} -> {text!r}", flush=True)
        share = ok / len(HELD_OUT)
        curve = ", ".join(f"{s}:{l:.3f}" for s, l in losses[:: max(1, len(losses) // 8)])
        print(f"{method}: adherence {ok}/{len(HELD_OUT)} = {share:.0%}; hyperparameters "
              f"{json.dumps(job['hyperparameters'])}; loss step {losses[0][0]} {losses[0][1]:.3f} -> "
              f"step {losses[-1][0]} {losses[-1][1]:.3f} ({time.time() - t:.0f}s)\n  curve {curve}",
              flush=True)
        results.append((method, share, job["hyperparameters"], losses[-1][1]))
    print("\nmethod          adherence  final loss  hyperparameters")
    for m, s, h, l in results:
        print(f"{m:15s} {s:>8.0%}  {l if l is None else round(l, 4)!s:>10}  {json.dumps(h)}")
    sys.exit(0 if all(s >= a.min for _, s, _, _ in results) else 1)


if __name__ == "__main__":
    main()
