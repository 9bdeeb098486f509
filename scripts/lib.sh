# Sourced (not run) by the scripts that drive a real itamaed: adherence.sh, peft-compare.sh,
# peft-interop.sh and run-examples.sh. One place for "which model", "which binary", "which PEFT
# venv" and "start a daemon and wait until it serves", so the scripts cannot drift apart.
#
# Environment read here:
#   ITAMAE_MODEL      base GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched if absent)
#   ITAMAED           use this itamaed binary and skip the cargo build
#   CARGO_TARGET_DIR  cargo target dir for the build (default $HOME/.cache/itamae-target)
#   ITAMAE_REFVENV    venv with torch/transformers/peft (default $HOME/.cache/itamae/refvenv)
#   ITAMAE_PIP_ARGS   extra pip args for that venv's install (e.g. a CPU-only torch index)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Sets `model` to the base GGUF, fetching the default one when it is missing.
itamae_model() {
  model="${ITAMAE_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
  [ -f "$model" ] || "$root/scripts/fetch-model.sh"
}

# Sets `bin` to an itamaed binary: $ITAMAED as given, else a release build of the workspace.
itamae_bin() {
  if [ -n "${ITAMAED:-}" ]; then
    bin="$ITAMAED"
  else
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/itamae-target}"
    cargo build --release -p itamae-daemon --bin itamaed
    bin="$CARGO_TARGET_DIR/release/itamaed"
  fi
  [ -x "$bin" ] || { echo "error: no itamaed binary at $bin" >&2; exit 1; }
}

# Sets `py` to the reference venv's python (torch, transformers, peft from PyPI), making the venv
# the first time.
itamae_peft_venv() {
  local venv="${ITAMAE_REFVENV:-$HOME/.cache/itamae/refvenv}"
  py="$venv/bin/python"
  if [ ! -x "$py" ] || ! "$py" -c 'import torch, transformers, peft, safetensors, numpy' 2>/dev/null; then
    echo "setting up the reference venv at $venv (torch, transformers, peft from PyPI) ..." >&2
    mkdir -p "$(dirname "$venv")"
    [ -x "$py" ] || python3 -m venv "$venv"
    "$py" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    "$py" -m pip install -q ${ITAMAE_PIP_ARGS:-} torch transformers accelerate peft safetensors gguf numpy
  fi
}

# itamae_serve PORT DATA_DIR: starts `$bin serve` on 127.0.0.1:PORT with DATA_DIR as its data
# directory (log in DATA_DIR/serve.log), stops it when the calling script exits, and returns once
# it serves. Sets `url` and `serve_pid`. /readyz, not /v1/models: the latter already answers
# (with an empty list) while the model is still loading.
itamae_serve() {
  local port=$1 data=$2
  mkdir -p "$data"
  env -u ITAMAE_API_KEYS -u ITAMAE_CONFIG "$bin" serve --model "$model" --host 127.0.0.1 \
    --port "$port" --data-dir "$data" >"$data/serve.log" 2>&1 &
  serve_pid=$!
  trap 'kill "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null || true' EXIT
  url="http://127.0.0.1:$port"
  for _ in $(seq 600); do
    curl -fsS "$url/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$serve_pid" 2>/dev/null || { cat "$data/serve.log" >&2; exit 1; }
    sleep 1
  done
  echo "error: itamaed did not become ready on $url in 10 minutes (log: $data/serve.log)" >&2
  exit 1
}
