"""PEFT interop check for itamae (run by scripts/peft-interop.sh).

Both directions, for LoRA, prompt tuning and prefix tuning (with and without the projection MLP):

  itamae -> PEFT: `itamaed train` writes an adapter; transformers + PEFT load it on the base that
                  `itamaed export-hf` wrote; PEFT's logits must equal `itamaed logits --adapter`.
  PEFT -> itamae: PEFT creates (random, non-trivial) adapters and `save_pretrained`s them;
                  `itamaed logits --adapter` must equal PEFT's own logits.

Every comparison is the max abs difference of the logits over every position of a fixed ChatML
prompt (and every vocabulary entry). Besides logits it checks that the token ids agree, that PEFT
really loaded every tensor of an itamae adapter (PEFT only warns about unknown keys, which would
otherwise leave its fresh init in place) and that itamae's adapter_config.json carries what PEFT
writes. Exits 1 when any check fails.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import warnings

# Everything is local: keep transformers/PEFT from trying the (unreachable) hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file

import peft
import transformers
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "<|im_start|>user\nWhat is sushi?<|im_end|>\n<|im_start|>assistant\n"
NUM_VIRTUAL = 8


def log(*a):
    print(*a, flush=True)


class Checker:
    def __init__(self, args):
        self.a = args
        self.rows = []  # (direction, what, figure, limit, ok, note)
        self.work = os.path.abspath(args.work)
        os.makedirs(self.work, exist_ok=True)
        self.hf_dir = os.path.join(self.work, "hf-base")
        self._base = None
        self._tok = None
        self._ids = None
        self.f64 = {}  # (direction, what) -> (itamae vs PEFT f64, PEFT f32 vs PEFT f64)

    # ------------------------------------------------------------------ plumbing
    def itamaed(self, *args, capture=False):
        cmd = [self.a.itamaed, *args]
        log("$ " + " ".join(repr(c) if (" " in c or "\n" in c) else c for c in cmd))
        t = time.time()
        r = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"itamaed {args[0]} failed with exit code {r.returncode}")
        log(f"  ({time.time() - t:.1f}s)")
        return r.stdout

    def itamae_logits(self, adapter=None):
        args = ["logits", "--model", self.a.model, "--prompt", PROMPT]
        if adapter:
            args += ["--adapter", adapter]
        out = json.loads(self.itamaed(*args, capture=True))
        return out["input_ids"], torch.tensor(np.asarray(out["logits"], dtype=np.float32))

    def row(self, direction, what, figure, limit, ok=None, note=""):
        if ok is None:
            ok = figure <= limit
        self.rows.append((direction, what, figure, limit, ok, note))
        status = "ok" if ok else "FAIL"
        fig = f"{figure:.3e}" if isinstance(figure, float) else str(figure)
        log(f"[{status}] {direction:14s} {what:34s} {fig}  (limit {limit}){'  ' + note if note else ''}")
        return ok

    def base(self, dtype=torch.float32):
        """A fresh copy of the exported base (PEFT mutates the model it wraps)."""
        m = AutoModelForCausalLM.from_pretrained(self.hf_dir, dtype=dtype)
        m.eval()
        return m

    def ids_tensor(self):
        return torch.tensor([self._ids])

    @torch.no_grad()
    def peft_logits(self, model, kind):
        ids = self.ids_tensor()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        if kind == "prompt":
            # PEFT returns the virtual positions too; itamae drops them.
            out = out[NUM_VIRTUAL:]
        assert out.shape[0] == ids.shape[1], (out.shape, ids.shape)
        return out

    def peft_logits64(self, adapter_dir, kind):
        """PEFT's logits for a saved adapter with the base in float64."""
        model = PeftModel.from_pretrained(self.base(torch.float64), adapter_dir)
        model.eval()
        return self.peft_logits(model, kind).double()

    def compare(self, direction, what, ref, got, ref64=None, note=""):
        """Max abs diff of itamae's logits `got` against PEFT's float32 logits `ref`.

        `ref64` is the same PEFT computation in float64 (the exact math). When the float32 figure
        is over the tolerance, the comparison still passes if itamae's distance to the float64
        result is within the tolerance or within twice PEFT's own float32 error (capped at 10x the
        tolerance): the two float32 runs then differ by rounding, not by what they compute. PEFT's
        default N(0, 1) prompt/prefix inits are that ill-conditioned: PEFT float32 vs float64 alone
        reaches ~1e-3 on some seeds.
        """
        if ref.shape != got.shape:
            return self.row(direction, what, float("inf"), self.a.tol, False,
                            f"shape {tuple(got.shape)} vs {tuple(ref.shape)}")
        d = (ref - got).abs()
        fig = float(d.max())
        worst = int(d.max(dim=1).values.argmax())
        note = (note + " " if note else "") + f"worst pos {worst}, |logit|max {ref.abs().max():.1f}"
        ok = fig <= self.a.tol
        if ref64 is not None:
            it64 = float((got.double() - ref64).abs().max())
            peft64 = float((ref.double() - ref64).abs().max())
            self.f64[(direction, what)] = (it64, peft64)
            note += f"; vs PEFT f64: itamae {it64:.2e}, PEFT f32 {peft64:.2e}"
            if not ok and it64 <= min(10 * self.a.tol, max(self.a.tol, 2 * peft64)):
                ok = True
                note += " -> accepted as float32 rounding (see compare())"
        if not bool((ref.argmax(-1) == got.argmax(-1)).all()):
            note += ", argmax differs"
        return self.row(direction, what, fig, self.a.tol, ok, note)

    # ------------------------------------------------------------------ steps
    def export_and_base(self):
        log("\n== base: itamaed export-hf and base logits")
        self.itamaed("export-hf", "--model", self.a.model, "--out", self.hf_dir)
        ids, it_logits = self.itamae_logits()
        self._ids = ids
        tok = AutoTokenizer.from_pretrained(self.hf_dir)
        hf_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
        self.row("base", "token ids (exported tokenizer)", 0 if hf_ids == ids else 1, 0,
                 hf_ids == ids, f"{len(ids)} tokens" + ("" if hf_ids == ids else f": itamae {ids} vs HF {hf_ids}"))
        base = self.base()
        with torch.no_grad():
            ref = base(self.ids_tensor()).logits[0]
            ref64 = self.base(torch.float64)(self.ids_tensor()).logits[0]
        self.base_logits = ref
        self.compare("base", "logits, no adapter", ref, it_logits, ref64)

    def check_saved_tensors(self, direction, what, model, adapter_dir):
        """Every tensor in the file must be what PEFT now holds (no silently ignored keys)."""
        file_sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        live = get_peft_model_state_dict(model, save_embedding_layers=False)
        missing = sorted(set(live) - set(file_sd))
        unexpected = sorted(set(file_sd) - set(live))
        worst = 0.0
        bad_shape = []
        for k in set(live) & set(file_sd):
            if live[k].shape != file_sd[k].shape:
                bad_shape.append(f"{k}: file {tuple(file_sd[k].shape)} PEFT {tuple(live[k].shape)}")
                continue
            worst = max(worst, float((live[k].detach().float().cpu() - file_sd[k].float()).abs().max()))
        ok = not missing and not unexpected and not bad_shape and worst == 0.0
        note = f"{len(file_sd)} tensors"
        if missing:
            note += f"; PEFT expects but file lacks {len(missing)}: {missing[:3]}"
        if unexpected:
            note += f"; file has unknown {len(unexpected)}: {unexpected[:3]}"
        if bad_shape:
            note += f"; shapes: {bad_shape[:3]}"
        return self.row(direction, what + " tensors loaded", 0 if ok else 1, 0, ok, note)

    def check_config(self, direction, what, adapter_dir, expected):
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            c = json.load(f)
        wrong = {k: (c.get(k), v) for k, v in expected.items() if c.get(k) != v}
        return self.row(direction, what + " adapter_config", 0 if not wrong else 1, 0, not wrong,
                        "" if not wrong else "got/expected " + json.dumps(wrong))

    def itamae_to_peft(self):
        log("\n== itamae -> PEFT: adapters trained by itamaed, loaded by PEFT")
        common = ["--model", self.a.model, "--data", self.a.data, "--batch-size", "2",
                  "--max-seq-len", "128", "--max-steps", str(self.a.steps), "--seed", "7"]
        cases = [
            ("lora", "lora", ["--r", "8", "--alpha", "16", "--target-modules", "all-linear",
                              "--learning-rate", "1e-3"],
             {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "task_type": "CAUSAL_LM"}),
            ("prompt", "prompt-tuning", ["--num-virtual-tokens", str(NUM_VIRTUAL), "--prompt-init", "text"],
             {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": NUM_VIRTUAL, "token_dim": 576,
              "num_transformer_submodules": 1, "task_type": "CAUSAL_LM"}),
            ("prefix", "prefix-tuning", ["--num-virtual-tokens", str(NUM_VIRTUAL)],
             {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": NUM_VIRTUAL, "token_dim": 192,
              "num_attention_heads": 3, "num_layers": 30, "num_transformer_submodules": 1,
              "prefix_projection": False, "task_type": "CAUSAL_LM"}),
            ("prefix+proj", "prefix-tuning", ["--num-virtual-tokens", str(NUM_VIRTUAL), "--prefix-projection"],
             {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": NUM_VIRTUAL, "token_dim": 192,
              "num_attention_heads": 3, "num_layers": 30, "prefix_projection": True}),
        ]
        for name, method, extra, expected in cases:
            d = os.path.join(self.work, "itamae-" + name.replace("+", "-"))
            self.itamaed("train", "--method", method, "--out", d, *common, *extra)
            self.check_config("itamae->PEFT", name, d, expected)
            kind = name.split("+")[0]
            if kind == "lora":
                sd = load_file(os.path.join(d, "adapter_model.safetensors"))
                bmax = max(float(v.abs().max()) for k, v in sd.items() if "lora_B" in k)
                self.row("itamae->PEFT", "lora max|B| (must be > 0)", bmax, "> 0", bmax > 0)
            _, it_logits = self.itamae_logits(d)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = PeftModel.from_pretrained(self.base(), d)
            for w in caught:
                if "key" in str(w.message).lower():
                    log("  PEFT warning: " + str(w.message)[:300])
            model.eval()
            self.check_saved_tensors("itamae->PEFT", name, model, d)
            ref = self.peft_logits(model, kind)
            moved = float((ref - self.base_logits).abs().max())
            self.row("itamae->PEFT", name + " effect (max|adapter-base|)", moved, f"> {100 * self.a.tol:g}",
                     moved > 100 * self.a.tol, "an adapter that changes nothing would make the check vacuous")
            self.compare("itamae->PEFT", name + " logits", ref, it_logits, self.peft_logits64(d, kind))

    def peft_to_itamae(self):
        log("\n== PEFT -> itamae: adapters created by PEFT, loaded by itamaed")
        cases = [
            ("lora", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                init_lora_weights=False, task_type="CAUSAL_LM")),
            ("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL,
                                          prompt_tuning_init="RANDOM")),
            ("prefix", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL)),
            ("prefix+proj", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL,
                                               prefix_projection=True, encoder_hidden_size=64)),
        ]
        for i, (name, cfg) in enumerate(cases):
            kind = name.split("+")[0]
            d = os.path.join(self.work, "peft-" + name.replace("+", "-"))
            base = self.base()
            torch.manual_seed(1234 + i)  # per case, so the random adapters are reproducible
            model = get_peft_model(base, cfg)
            model.eval()
            if kind == "lora":
                # PEFT's non-default init gives B the nn.Linear init (|B| up to 1/sqrt(r)), which
                # wrecks the model; shrink it so the check runs on realistic, still clearly
                # non-zero deltas.
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if "lora_B" in n:
                            p.mul_(self.a.lora_b_scale)
            model.save_pretrained(d)
            # Reference = PEFT's own inference path on the saved adapter (inference_mode=True: for
            # prefix tuning with projection that is the saved post-MLP tensor, as itamae reads it).
            loaded = PeftModel.from_pretrained(self.base(), d)
            loaded.eval()
            ref = self.peft_logits(loaded, kind)
            live = self.peft_logits(model, kind)
            self.row("PEFT->itamae", name + " PEFT saved==live", float((ref - live).abs().max()),
                     self.a.tol, None, "(PEFT self-consistency)")
            moved = float((ref - self.base_logits).abs().max())
            _, it_logits = self.itamae_logits(d)
            self.row("PEFT->itamae", name + " effect (max|adapter-base|)", moved, f"> {100 * self.a.tol:g}",
                     moved > 100 * self.a.tol, "an adapter that changes nothing would make the check vacuous")
            self.compare("PEFT->itamae", name + " logits", ref, it_logits, self.peft_logits64(d, kind))

    def summary(self):
        log("\n== summary (max abs diff of logits over all positions, tolerance %g)" % self.a.tol)
        log(f"prompt: {PROMPT!r} ({len(self._ids or [])} tokens); torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}")
        log("figure = itamae vs PEFT float32; f64 columns: itamae vs PEFT float64, PEFT float32 vs float64")
        log(f"{'direction':14s} {'check':40s} {'figure':>10s} {'it-vs-f64':>10s} {'peft32-f64':>10s}  result")
        for direction, what, fig, limit, ok, note in self.rows:
            f = f"{fig:.3e}" if isinstance(fig, float) else str(fig)
            e = self.f64.get((direction, what))
            e = f"{e[0]:10.3e} {e[1]:10.3e}" if e else " " * 21
            log(f"{direction:14s} {what:40s} {f:>10s} {e}  {'PASS' if ok else 'FAIL'}")
        bad = [r for r in self.rows if not r[4]]
        log(f"\n{len(self.rows) - len(bad)}/{len(self.rows)} checks passed")
        return not bad


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--itamaed", required=True, help="path to the itamaed binary")
    p.add_argument("--model", required=True, help="base GGUF")
    p.add_argument("--data", required=True, help="chat JSONL for itamaed train")
    p.add_argument("--work", required=True, help="scratch directory (HF export, adapters)")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=5, help="training steps per itamae adapter")
    p.add_argument("--lora-b-scale", type=float, default=0.05,
                   help="factor applied to PEFT's random lora_B before saving (PEFT->itamae)")
    p.add_argument("--only", choices=["itamae-to-peft", "peft-to-itamae"], help="run one direction")
    a = p.parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    c = Checker(a)
    try:
        c.export_and_base()
        if a.only != "peft-to-itamae":
            c.itamae_to_peft()
        if a.only != "itamae-to-peft":
            c.peft_to_itamae()
    except Exception as e:  # report what ran so far, then fail
        import traceback
        traceback.print_exc()
        c.rows.append(("error", type(e).__name__, float("nan"), "-", False, str(e)[:200]))
    sys.exit(0 if c.summary() else 1)


if __name__ == "__main__":
    main()
