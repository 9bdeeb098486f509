"""Independent reference for itamae's logits parity test.

Loads the SmolLM2 GGUF with HF `transformers` (which dequantizes it to float32 with its own GGUF
reader and its own Llama implementation), runs one forward pass on a fixed ChatML prompt and stores
a small fixture: the input ids, and for every position the logits at a fixed subset of the
vocabulary plus the top-10 ids. Run by scripts/make-reference-fixture.sh; the result is committed.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path = os.path.abspath(sys.argv[1])
out_path = sys.argv[2]
d, f = os.path.split(gguf_path)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
model.eval()
prompt = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)
ids = tok(prompt, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float()
subset = list(range(0, logits.shape[-1], 97))
fixture = {
    "source": "transformers %s, torch %s, GGUF dequantized to float32" % (
        __import__("transformers").__version__, torch.__version__),
    "prompt": prompt,
    "input_ids": ids,
    "vocab_subset": subset,
    "logits_subset": [[round(float(x), 5) for x in row[subset]] for row in logits],
    "top10": [[int(i) for i in torch.topk(row, 10).indices] for row in logits],
    "top10_logits": [[round(float(x), 5) for x in torch.topk(row, 10).values] for row in logits],
}
with open(out_path, "w") as fh:
    json.dump(fixture, fh)
print("wrote", out_path, "positions", len(ids))
