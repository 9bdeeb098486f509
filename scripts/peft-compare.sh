#!/usr/bin/env bash
# Training-curve comparison against HF PEFT: LoRA, prompt tuning and prefix tuning trained by
# both systems on the same data with the same settings; prints both loss curves step by step.
# Same initial weights -> every step within 3%; each side's own init -> final losses within 10%,
# two-sided (prefix tuning's deliberate init gap is reported as EXPLAINED, see peft_compare.py).
# The defaults (8 examples, 20 steps, 7 runs) take about an hour on a loaded 2-core machine;
# --examples 4 --steps 10 a quarter of that. Exit status: 0 = every rule met.
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
