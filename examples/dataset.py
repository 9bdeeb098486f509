"""Shared by the examples' make_data.py scripts: writes train.jsonl, valid.jsonl and prompts.txt
beside the calling script from hand-written (question, answer) pairs.

Every sixth pair goes to validation (about 17%), in a fixed order, so a re-run writes the same
files. Held-out prompts must appear in neither split; that is checked here and again by the
daemon's test tests/examples_data.rs.
"""
import json
import os
import sys


def write(script, pairs, prompts, valid_every=6):
    out = os.path.dirname(os.path.abspath(script))
    questions = [q for q, _ in pairs]
    dupes = {q for q in questions if questions.count(q) > 1}
    if dupes:
        sys.exit(f"duplicate questions: {sorted(dupes)}")
    leaked = set(prompts) & set(questions)
    if leaked:
        sys.exit(f"held-out prompts also in the data: {sorted(leaked)}")
    train, valid = [], []
    for i, (q, a) in enumerate(pairs):
        row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        (valid if i % valid_every == valid_every - 1 else train).append(row)
    for name, rows in (("train.jsonl", train), ("valid.jsonl", valid)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(prompts) + "\n")
    print(f"{out}: {len(train)} train, {len(valid)} valid, {len(prompts)} held-out prompts")
