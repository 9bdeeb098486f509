"""Peer side of `itamae-bench train`: HF PEFT + transformers (torch CPU) LoRA SFT on the very same
rows, hyperparameters and model (an HF directory exported by itamae from the GGUF).

argv: hf_dir seq batch steps. Speaks the line protocol of daemon/src/bin/itamae-bench/train.rs:
prints {"ready": true} once loaded, runs one optimizer step per `step` line on stdin and prints
{"secs", "loss"} for it; after steps + 1 steps (the first a warm-up the driver does not time)
prints {"peak_rss_bytes"}. The driver interleaves these steps with itamae's.
"""
import json
import os
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

hf_dir, seq, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
# as many threads as itamae's pools use (every CPU this process may run on)
torch.set_num_threads(len(os.sched_getaffinity(0)))
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
vocab = model.config.vocab_size


def ids(row, n):  # same formula as itamae's bench_train_ids
    return [((i * 7919 + row * 104729 + 17) % (vocab - 1)) + 1 for i in range(n)]


rows = torch.tensor([ids(r, seq + 1) for r in range(batch)])
inputs, labels = rows[:, :-1], rows[:, 1:]
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
print(json.dumps({"ready": True}), flush=True)
for step in range(steps + 1):
    if not sys.stdin.readline():
        sys.exit(0)
    t = time.perf_counter()
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    secs = time.perf_counter() - t
    print(json.dumps({"secs": secs, "loss": loss.item()}), flush=True)
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
