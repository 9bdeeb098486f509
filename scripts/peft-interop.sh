#!/usr/bin/env bash
# PEFT interop check: itamae adapters load in HF PEFT and PEFT adapters load in itamae, with the
# same logits (max abs diff <= 1e-3 over every position of a fixed ChatML prompt).
# Ensures the model (scripts/fetch-model.sh), a Python venv with torch/transformers/peft (from
# PyPI) and a release build of itamaed, then runs scripts/peft_interop.py. Exit status: 0 = pass.
#
# Environment:
#   ITAMAE_REFVENV      venv to create/reuse   (default $HOME/.cache/itamae/refvenv)
#   ITAMAE_PIP_ARGS     extra pip args for the venv install, e.g.
#                       "--extra-index-url https://download.pytorch.org/whl/cpu" for CPU-only torch
#   CARGO_TARGET_DIR    cargo target dir       (default $HOME/.cache/itamae-target)
#   ITAMAED             use this itamaed binary and skip the cargo build
#   ITAMAE_MODEL        base GGUF              (default models/SmolLM2-135M-Instruct.Q4_1.gguf)
#   ITAMAE_INTEROP_DATA training JSONL         (default tests/data/persona_train.jsonl)
#   ITAMAE_INTEROP_WORK scratch dir            (default a fresh mktemp dir, kept for inspection)
# Extra arguments are passed to peft_interop.py (e.g. --tol 1e-4, --steps 10, --only peft-to-itamae).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$root"
itamae_model
itamae_peft_venv
itamae_bin

data="${ITAMAE_INTEROP_DATA:-$root/tests/data/persona_train.jsonl}"
work="${ITAMAE_INTEROP_WORK:-$(mktemp -d -t itamae-interop.XXXXXX)}"
mkdir -p "$work"
if [ ! -f "$data" ]; then
  # Tiny fallback so the check does not depend on the test data set.
  data="$work/chat.jsonl"
  for q in "What is sushi?|Rice seasoned with vinegar, topped or rolled with fish." \
           "What is wasabi?|A pungent green paste made from a Japanese root." \
           "What is nigiri?|A hand-pressed mound of rice with a slice of fish on top." \
           "What is a maki?|Rice and fillings rolled in a sheet of nori."; do
    printf '{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "%s"}]}\n' \
      "${q%%|*}" "${q#*|}"
  done > "$data"
fi

echo "work dir: $work"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$py" "$root/scripts/peft_interop.py" --itamaed "$bin" --model "$model" --data "$data" --work "$work" "$@"
