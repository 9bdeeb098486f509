#!/usr/bin/env bash
# Creates (or reuses) the venv with torch, transformers and peft from PyPI used by the PEFT peer
# benchmark (`itamae-bench train`) and the interop check. Prints the python path to pass as
# ITAMAE_PEFT_PYTHON.
set -euo pipefail
venv="${ITAMAE_REF_VENV:-$HOME/.cache/itamae/refvenv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers, peft' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers accelerate peft safetensors gguf numpy
fi
echo "$venv/bin/python"
