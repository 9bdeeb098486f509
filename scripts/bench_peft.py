"""Peer side of `itamae-bench train`: HF PEFT + transformers (torch CPU) LoRA SFT on the very same
rows, hyperparameters and model (an HF directory exported by itamae from the GGUF).

argv: hf_dir seq batch steps. Prints one JSON line: secs_per_step, tokens_per_sec, peak_rss_bytes.
One warm-up step is not timed, as on the itamae side.
"""
import json
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

hf_dir, seq, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(2)
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
times = []
for step in range(steps + 1):
    t = time.perf_counter()
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
    print(f"step {step} loss {loss.item():.4f} ({times[-1]:.2f} s)", file=sys.stderr)
secs = sum(times[1:]) / max(1, len(times) - 1)
print(json.dumps({"secs_per_step": secs, "tokens_per_sec": seq * batch / secs,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
