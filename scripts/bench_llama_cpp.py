"""Peer side of `itamae-bench decode`: llama.cpp (via llama-cpp-python) on the very same GGUF.

argv: model_path prompt n_tokens runs. Prints one JSON line: prompt_tps, decode_tps (medians).
Decoding is greedy and ignores EOS so both sides generate exactly n_tokens.
"""
import json
import statistics
import sys
import time

from llama_cpp import Llama

path, prompt, n, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=1024, n_threads=2, n_batch=512, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
ptps, dtps = [], []
for run in range(runs + 1):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    dec = time.perf_counter() - t
    if run > 0:
        ptps.append(len(ids) / prefill)
        dtps.append(n / dec)
print(json.dumps({"prompt_tokens": len(ids), "prompt_tps": statistics.median(ptps),
                  "decode_tps": statistics.median(dtps)}))
