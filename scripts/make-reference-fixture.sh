#!/usr/bin/env bash
# Regenerates tests/fixtures/reference_logits.json with HF transformers in a project-local venv
# (packages from PyPI). Developers run this once; CI uses the committed fixture.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ITAMAE_REF_VENV:-$HOME/.cache/itamae/refvenv}"
"$root/scripts/fetch-model.sh"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers accelerate gguf numpy sentencepiece
fi
"$venv/bin/python" "$root/scripts/reference_logits.py" \
  "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$root/tests/fixtures/reference_logits.json"
