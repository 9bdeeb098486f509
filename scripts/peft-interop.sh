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
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# 1. model
model="${ITAMAE_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [ ! -f "$model" ]; then
  "$root/scripts/fetch-model.sh"
fi

# 2. venv
venv="${ITAMAE_REFVENV:-$HOME/.cache/itamae/refvenv}"
py="$venv/bin/python"
if [ ! -x "$py" ] || ! "$py" -c 'import torch, transformers, peft, safetensors, numpy' 2>/dev/null; then
  echo "setting up the reference venv at $venv (torch, transformers, peft from PyPI) ..."
  if [ ! -x "$py" ]; then
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
  fi
  "$py" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$py" -m pip install -q ${ITAMAE_PIP_ARGS:-} torch transformers peft safetensors numpy
fi

# 3. itamaed
if [ -n "${ITAMAED:-}" ]; then
  bin="$ITAMAED"
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/itamae-target}"
  cargo build --release -p itamae-daemon
  bin="$CARGO_TARGET_DIR/release/itamaed"
fi
[ -x "$bin" ] || { echo "error: no itamaed binary at $bin" >&2; exit 1; }

# 4. data
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
