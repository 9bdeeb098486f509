#!/usr/bin/env bash
# Creates (or reuses) the venv with torch, transformers and peft from PyPI used by the PEFT peer
# benchmark (`itamae-bench train`), the interop check and the curve comparison. Prints the
# python path to pass as ITAMAE_PEFT_PYTHON. ITAMAE_REF_VENV (or ITAMAE_REFVENV) picks the venv.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ITAMAE_REFVENV="${ITAMAE_REF_VENV:-${ITAMAE_REFVENV:-}}"
itamae_peft_venv
echo "$py"
