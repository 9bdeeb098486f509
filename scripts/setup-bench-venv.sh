#!/usr/bin/env bash
# Creates the peer venv for `itamae-bench decode`: llama-cpp-python from PyPI (built from source,
# ~10+ minutes on 2 cores). Prints the python path to pass as ITAMAE_BENCH_PYTHON.
set -euo pipefail
venv="${ITAMAE_BENCH_VENV:-$HOME/.cache/itamae/benchvenv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install -q llama-cpp-python==0.3.36
fi
echo "$venv/bin/python"
