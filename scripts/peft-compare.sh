#!/usr/bin/env bash
# Training-curve comparison against HF PEFT: LoRA, prompt tuning and prefix tuning trained by
# both systems on the same data with the same settings; prints both loss curves step by step.
# Same initial weights -> every step within 3%; each side's own init -> final losses within 10%.
# Takes a few minutes (8 examples, 20 steps per run, 12 runs). Exit status: 0 = every tolerance met.
#
# Environment (as scripts/peft-interop.sh):
#   ITAMAE_REFVENV      venv with torch/transformers/peft (default $HOME/.cache/itamae/refvenv;
#                       made by scripts/setup-peft-venv.sh when missing)
#   CARGO_TARGET_DIR    cargo target dir (default $HOME/.cache/itamae-target)
#   ITAMAED             use this itamaed binary and skip the cargo build
#   ITAMAE_MODEL        base GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf)
#   ITAMAE_COMPARE_WORK scratch dir (default a fresh mktemp dir, kept for inspection)
# Extra arguments go to peft_compare.py (--steps, --examples, --methods lora,prefix, --tol-same ...).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

model="${ITAMAE_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$model" ] || "$root/scripts/fetch-model.sh"

venv="${ITAMAE_REFVENV:-$HOME/.cache/itamae/refvenv}"
py="$venv/bin/python"
if [ ! -x "$py" ] || ! "$py" -c 'import torch, transformers, peft, safetensors' 2>/dev/null; then
  ITAMAE_REF_VENV="$venv" "$root/scripts/setup-peft-venv.sh"
fi

if [ -n "${ITAMAED:-}" ]; then
  bin="$ITAMAED"
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/itamae-target}"
  cargo build --release -p itamae-daemon
  bin="$CARGO_TARGET_DIR/release/itamaed"
fi
[ -x "$bin" ] || { echo "error: no itamaed binary at $bin" >&2; exit 1; }

work="${ITAMAE_COMPARE_WORK:-$(mktemp -d -t itamae-compare.XXXXXX)}"
echo "work dir: $work"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$py" "$root/scripts/peft_compare.py" --itamaed "$bin" --model "$model" \
  --data "$root/tests/data/persona_train.jsonl" --work "$work" "$@"
