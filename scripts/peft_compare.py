"""Training-curve comparison of itamae against HF PEFT (run by scripts/peft-compare.sh).

For LoRA, prompt tuning and prefix tuning, both systems train on the same small persona dataset
with the same settings, and the per-step training losses are printed side by side:

  same-init  both start from the same adapter weights, saved by PEFT and passed to
             `itamaed train --init-adapter`: PEFT's fresh LoRA (Kaiming-uniform A, zero B),
             PEFT's TEXT-initialised prompt, and for prefix tuning both the model's own
             keys/values of itamae's init text and PEFT's default N(0, 1) prefix. The curves
             must agree within --tol-same (relative) at every step.
  own-init   each side starts from its own default init. Final losses must agree within
             --tol-own (relative, two-sided). Prompt tuning: PEFT's prompt_tuning_init=TEXT
             with itamae's init text is itamae's default init (checked: same token ids), so
             both sides start alike. Prefix tuning: itamae's default init (the model's own
             keys/values of a text) starts near the base model's loss, PEFT's N(0, 1) at about
             twice it, so itamae ends far lower; that gap is reported as EXPLAINED, not as a
             failure, only when the same-init run from PEFT's own N(0, 1) prefix agreed (then
             the trainers match and the gap is the init alone). itamae ending higher than PEFT
             by more than --tol-own always fails.

Settings shared by both sides: every example in every step (batch = dataset, so the batch order
cannot differ), no dropout, AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), global-norm
clipping at 1.0, linear warmup over round(0.05 * steps) steps then cosine decay to 0 (itamae's
schedule), loss = sum of token NLLs over completion tokens / their count. Tokenization is
checked first: PEFT's base-model loss on the batch must equal `itamaed eval`'s.
Exits 1 when any tolerance fails.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from peft import (  # noqa: E402
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
import transformers  # noqa: E402

# itamae's defaults that the comparison mirrors on the PEFT side.
INIT_TEXT = "You are a helpful assistant."  # prompt/prefix tuning init text
WARMUP_RATIO = 0.05
NUM_VIRTUAL = 8
LR = {"lora": 2e-4, "prompt": 3e-2, "prefix": 1e-2}


def log(*a):
    print(*a, flush=True)


def lr_at(peak, warmup, total, step):
    """itamae's train/optim.rs lr_at, cosine."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max((step - min(warmup, step)) / span, 0.0), 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class Compare:
    def __init__(self, a):
        self.a = a
        self.work = os.path.abspath(a.work)
        os.makedirs(self.work, exist_ok=True)
        self.hf = os.path.join(self.work, "hf-base")
        self.failures = []

    def itamaed(self, *args):
        cmd = [self.a.itamaed, *args]
        log("$ " + " ".join(cmd))
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-3000:])
            raise RuntimeError(f"itamaed {args[0]} failed ({r.returncode})")
        return r.stdout, r.stderr

    # ------------------------------------------------------------------ data
    def prepare(self):
        if not os.path.exists(os.path.join(self.hf, "config.json")):
            self.itamaed("export-hf", "--model", self.a.model, "--out", self.hf)
        self.tok = AutoTokenizer.from_pretrained(self.hf)
        rows = [json.loads(l) for l in open(self.a.data)][: self.a.examples]
        pc = []
        for r in rows:
            m = r["messages"]
            q = next(x["content"] for x in m if x["role"] == "user")
            ans = next(x["content"] for x in m if x["role"] == "assistant")
            pc.append({"prompt": f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
                       "completion": ans})
        self.data = os.path.join(self.work, "data.jsonl")
        with open(self.data, "w") as f:
            for r in pc:
                f.write(json.dumps(r) + "\n")
        # itamae: prompt ids (weight 0), completion ids + the first EOS id (weight 1); no BOS
        # unless the GGUF asks for it (SmolLM2 does not).
        eos = self.tok.eos_token_id
        ex = []
        for r in pc:
            p = self.tok(r["prompt"], add_special_tokens=False)["input_ids"]
            c = self.tok(r["completion"], add_special_tokens=False)["input_ids"] + [eos]
            ex.append((p + c, [0] * len(p) + [1] * len(c)))
        L = max(len(i) for i, _ in ex)
        self.ids = torch.tensor([i + [0] * (L - len(i)) for i, _ in ex])
        self.w = torch.tensor([x + [0] * (L - len(x)) for _, x in ex], dtype=torch.float32)[:, 1:]
        self.mask = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i, _ in ex])
        self.L = L
        base = self.base()
        with torch.no_grad():
            ours_base = self.loss(base, None)
        out, _ = self.itamaed("eval", "--model", self.a.model, "--data", self.data, "--json",
                              "--batch-size", str(len(ex)))
        it = json.loads(out.strip().splitlines()[-1])["loss"]
        ok = abs(it - float(ours_base)) < 1e-3 * max(1.0, abs(it))
        log(f"base loss on the batch: PEFT/transformers {float(ours_base):.5f}, itamaed eval {it:.5f}"
            f" -> {'same tokens' if ok else 'MISMATCH'}")
        if not ok:
            self.failures.append("tokenization/base loss mismatch")
        self.base_loss = float(ours_base)
        # PEFT's TEXT prompt init tokenizes with special tokens, itamae's without.
        with_special = self.tok(INIT_TEXT)["input_ids"]
        plain = self.tok(INIT_TEXT, add_special_tokens=False)["input_ids"]
        log(f"prompt init text ids: PEFT {with_special}, itamae {plain} -> "
            f"{'same' if with_special == plain else 'DIFFERENT'}")
        if with_special != plain:
            self.failures.append("prompt tuning init text tokenizes differently in PEFT")

    def base(self):
        return AutoModelForCausalLM.from_pretrained(self.hf, dtype=torch.float32)

    def loss(self, model, kind):
        lg = model(input_ids=self.ids, attention_mask=self.mask).logits
        if kind == "prompt":
            lg = lg[:, NUM_VIRTUAL:]
        lg = lg[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), self.ids[:, 1:].reshape(-1), reduction="none"
        ).view(self.w.shape)
        return (nll * self.w).sum() / self.w.sum()

    # ------------------------------------------------------------------ PEFT side
    def peft_model(self, kind):
        if kind == "lora":
            cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                             task_type="CAUSAL_LM")
        elif kind == "prompt":
            # TEXT init from itamae's default init text: the same start as itamae's default
            # (PEFT tokenizes with special tokens, SmolLM2 adds none; prepare() checks the ids).
            cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL,
                                     prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
                                     tokenizer_name_or_path=self.hf)
        else:
            cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL)
        torch.manual_seed(self.a.seed)
        return get_peft_model(self.base(), cfg)

    def prefix_kv_init(self, model):
        """itamae's prefix init: the model's own KV cache of BOS + INIT_TEXT, cycled to P."""
        ids = [self.tok.bos_token_id] + self.tok(INIT_TEXT, add_special_tokens=False)["input_ids"]
        ids = (ids * NUM_VIRTUAL)[:NUM_VIRTUAL]
        base = model.get_base_model()
        with torch.no_grad():
            out = base(input_ids=torch.tensor([ids]), use_cache=True)
        c = out.past_key_values
        kv = []
        for layer in c.layers:
            kv += [layer.keys[0], layer.values[0]]
        return torch.stack(kv).permute(2, 0, 1, 3).reshape(NUM_VIRTUAL, -1)

    def peft_curve(self, kind, init, model):
        """PEFT's curve from `init`, trained once per run settings and kept in the work dir,
        so a re-run (or the own-init comparison) does not train the same thing again."""
        key = f"{kind}-{init}-{self.ids.shape[0]}ex-{self.a.steps}steps-seed{self.a.seed}-lr{LR[kind]}"
        path = os.path.join(self.work, "peft-curves.json")
        cache = json.load(open(path)) if os.path.exists(path) else {}
        if key not in cache:
            if model is None:
                model = self.peft_model(kind)
            cache[key] = self.train_peft(model, kind)
            with open(path + ".tmp", "w") as f:
                json.dump(cache, f)
            os.replace(path + ".tmp", path)
        else:
            log(f"  PEFT {kind} from {init}'s init: curve reused from {path}")
        return cache[key]

    def train_peft(self, model, kind):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR[kind], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        steps = self.a.steps
        # Rust's f64::round rounds halves away from zero; Python's round() to even (0.5 -> 0).
        warmup = math.floor(WARMUP_RATIO * steps + 0.5)
        model.train()
        out = []
        for s in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(LR[kind], warmup, steps, s)
            l = self.loss(model, kind)
            l.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            out.append(float(l))
            log(f"  PEFT {kind} step {s + 1}/{steps}: loss {out[-1]:.4f}")
        return out

    # ------------------------------------------------------------------ itamae side
    def train_itamae(self, kind, name, init_dir=None):
        d = os.path.join(self.work, f"itamae-{kind}-{name}")
        method = {"lora": "lora", "prompt": "prompt-tuning", "prefix": "prefix-tuning"}[kind]
        args = ["train", "--model", self.a.model, "--data", self.data, "--out", d,
                "--method", method, "--batch-size", str(self.ids.shape[0]), "--epochs", "1000",
                "--max-steps", str(self.a.steps), "--learning-rate", str(LR[kind]),
                "--warmup-ratio", str(WARMUP_RATIO), "--schedule", "cosine", "--weight-decay", "0",
                "--max-grad-norm", "1", "--max-seq-len", "512", "--seed", str(self.a.seed)]
        if kind == "lora":
            args += ["--r", "8", "--alpha", "16", "--dropout", "0", "--target-modules", "all-linear"]
        else:
            args += ["--num-virtual-tokens", str(NUM_VIRTUAL)]
        if init_dir:
            args += ["--init-adapter", init_dir]
        _, err = self.itamaed(*args)
        losses = [float(m) for m in re.findall(r"^step\s+\d+/\d+ \| loss ([0-9.eE+-]+)", err, re.M)]
        if len(losses) != self.a.steps:
            raise RuntimeError(f"expected {self.a.steps} step lines from itamaed, got {len(losses)}")
        return losses

    # ------------------------------------------------------------------ comparisons
    def same_init(self, kind, init):
        """`init`: "itamae" (prefix: the model's own KV of the init text) or "peft" (PEFT's
        fresh adapter as get_peft_model makes it)."""
        model = self.peft_model(kind)
        if kind == "prefix" and init == "itamae":
            with torch.no_grad():
                model.prompt_encoder["default"].embedding.weight.copy_(self.prefix_kv_init(model))
        init_dir = os.path.join(self.work, f"init-{kind}-{init}")
        model.save_pretrained(init_dir)
        t = time.time()
        peft_a = self.peft_curve(kind, init, model)
        log(f"  PEFT {kind} same-init ({init}'s init): {time.time() - t:.0f}s")
        ours_a = self.train_itamae(kind, f"same-init-{init}", init_dir)
        worst = max(abs(o - p) / abs(p) for o, p in zip(ours_a, peft_a))
        ok_a = worst <= self.a.tol_same
        return peft_a, ours_a, worst, ok_a

    def run(self, kind):
        # (a) same initial weights; prefix tuning from either side's init, as the two differ.
        inits = self.a.prefix_same_init.split(",") if kind == "prefix" else ["peft"]
        peft_same_ok = None  # did the run from PEFT's own init agree?
        for init in inits if "same" in self.a.modes else []:
            peft_a, ours_a, worst, ok_a = self.same_init(kind, init)
            if init == "peft":
                peft_same_ok = ok_a
            if not ok_a:
                self.failures.append(f"{kind} same-init ({init}'s init): worst step differs by "
                                     f"{100 * worst:.1f}%")
            self.print_same(kind, init, peft_a, ours_a, worst, ok_a)
        # (b) each side's own init
        if "own" in self.a.modes:
            t = time.time()
            # PEFT's own init is what get_peft_model makes with the seed, the same adapter the
            # same-init run from PEFT's init started from: its curve is that run's.
            peft_b = self.peft_curve(kind, "peft", None)
            log(f"  PEFT {kind} own-init: {time.time() - t:.0f}s")
            ours_b = self.train_itamae(kind, "own-init")
            rel = (ours_b[-1] - peft_b[-1]) / abs(peft_b[-1])
            if abs(rel) <= self.a.tol_own:
                verdict = "PASS"
            elif rel < 0 and kind == "prefix" and peft_same_ok:
                verdict = "EXPLAINED"
            else:
                verdict = "FAIL"
                self.failures.append(f"{kind} own-init: final losses differ by {100 * rel:+.1f}%")
            self.print_own(kind, peft_b, ours_b, rel, verdict)

    def header(self, kind, what):
        log(f"\n== {kind}, {what} (lr {LR[kind]}, {self.a.steps} steps, batch {self.ids.shape[0]}, "
            f"base-model loss {self.base_loss:.4f})")

    def print_same(self, kind, init, peft_a, ours_a, worst, ok_a):
        self.header(kind, f"same init ({init}'s, loaded into the other side)")
        log(f"{'step':>4} | {'PEFT':>9} {'itamae':>9} {'diff%':>7}")
        for i, (p, o) in enumerate(zip(peft_a, ours_a)):
            log(f"{i + 1:>4} | {p:>9.4f} {o:>9.4f} {100 * (o - p) / p:>+7.3f}")
        log(f"{kind} same-init ({init}'s): worst |diff| {100 * worst:.3f}% "
            f"(limit {100 * self.a.tol_same:g}% at every step) {'PASS' if ok_a else 'FAIL'}")

    def print_own(self, kind, peft_b, ours_b, rel, verdict):
        self.header(kind, "each side's own init")
        log(f"{'step':>4} | {'PEFT':>9} {'itamae':>9} {'diff%':>7}")
        for i, (p, o) in enumerate(zip(peft_b, ours_b)):
            log(f"{i + 1:>4} | {p:>9.4f} {o:>9.4f} {100 * (o - p) / p:>+7.2f}")
        log(f"{kind} own-init: final {peft_b[-1]:.4f} (PEFT) vs {ours_b[-1]:.4f} (itamae), "
            f"{100 * rel:+.1f}% (limit +-{100 * self.a.tol_own:g}%, two-sided) {verdict}")
        if verdict == "EXPLAINED":
            log("  itamae ends lower by more than the limit because of the init alone: its prefix "
                "starts as the model's own keys/values of a text, near the base model's loss "
                f"(step 1 {ours_b[0]:.4f}, base {self.base_loss:.4f}), while PEFT's N(0, 1) prefix "
                f"starts far above it (step 1 {peft_b[0]:.4f}). From PEFT's own N(0, 1) prefix "
                "the two trainers agree (the same-init run above), so the trainer is not the cause.")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--itamaed", required=True)
    p.add_argument("--model", required=True, help="base GGUF")
    p.add_argument("--data", required=True, help="chat JSONL (user + assistant turns)")
    p.add_argument("--work", required=True)
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tol-same", type=float, default=0.03)
    p.add_argument("--tol-own", type=float, default=0.10)
    p.add_argument("--methods", default="lora,prompt,prefix")
    p.add_argument("--modes", default="same,own", help="same (shared init), own (each side's init)")
    p.add_argument("--prefix-same-init", default="itamae,peft",
                   help="prefix same-init runs: from itamae's init (the model's KV of the init "
                        "text), from PEFT's N(0, 1) one, or both")
    a = p.parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    c = Compare(a)
    try:
        c.prepare()
        for kind in a.methods.split(","):
            c.run(kind)
    except Exception as e:  # report what ran, then fail
        import traceback
        traceback.print_exc()
        c.failures.append(f"error: {e}")
    log(f"\ntorch {torch.__version__}, transformers {transformers.__version__}")
    if c.failures:
        log("FAILED: " + "; ".join(c.failures))
        sys.exit(1)
    log("all tolerances met")


if __name__ == "__main__":
    main()
