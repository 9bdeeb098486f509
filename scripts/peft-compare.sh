#!/usr/bin/env bash
# Training-curve comparison against HF PEFT: LoRA, prompt tuning and prefix tuning trained by
# both systems on the same data with the same settings; prints both loss curves step by step.
# Same initial weights -> every step within 3%; each side's own init -> final losses within 10%,
# two-sided (prefix tuning's deliberate init gap is reported as EXPLAINED, see peft_compare.py).
# PEFT trains 4 curves (its own-init curve is its same-init one), itamae 7. The defaults (8
# examples, 20 steps) take a few hours on a 2-core machine under heavy load (a PEFT step 2-5
# minutes at load 16); --examples 2 --steps 6 about 40 minutes there. Exit status: 0 = every
# rule met.
#
# Environment: ITAMAE_REFVENV, CARGO_TARGET_DIR, ITAMAED, ITAMAE_MODEL (see scripts/lib.sh);
#   ITAMAE_COMPARE_WORK scratch dir (default a fresh mktemp dir, kept for inspection)
# Extra arguments go to peft_compare.py (--steps, --examples, --methods lora,prompt,prefix,
# --modes same,own, --prefix-same-init itamae,peft, --tol-same, --tol-own).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$root"
itamae_model
itamae_peft_venv
itamae_bin
work="${ITAMAE_COMPARE_WORK:-$(mktemp -d -t itamae-compare.XXXXXX)}"
echo "work dir: $work"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$py" "$root/scripts/peft_compare.py" --itamaed "$bin" --model "$model" \
  --data "$root/tests/data/persona_train.jsonl" --work "$work" "$@"
