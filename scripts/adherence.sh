#!/usr/bin/env bash
# `auto` hyperparameters reach the persona: a 20-example greeting + signature dataset trained
# through the jobs API with no hyperparameters, for LoRA, prompt tuning and prefix tuning; each
# variant must carry both on >= 90% of held-out prompts (greedy). Too slow for CI (three
# 60-step jobs): run it by hand. Exit status: 0 = every method reached the bar.
#
# Environment: CARGO_TARGET_DIR / ITAMAED (the binary, as scripts/peft-interop.sh), ITAMAE_MODEL,
# ITAMAE_ADHERENCE_PORT (default 18089). Extra arguments go to adherence.py (--methods, --min).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
model="${ITAMAE_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$model" ] || "$root/scripts/fetch-model.sh"
if [ -n "${ITAMAED:-}" ]; then
  bin="$ITAMAED"
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/itamae-target}"
  cargo build --release -p itamae-daemon
  bin="$CARGO_TARGET_DIR/release/itamaed"
fi
port="${ITAMAE_ADHERENCE_PORT:-18089}"
data="$(mktemp -d -t itamae-adherence.XXXXXX)"
"$bin" serve --model "$model" --port "$port" --data-dir "$data" >"$data/serve.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  # /v1/models answers (empty) while the model loads; /readyz only once it serves.
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$data/serve.log" >&2; exit 1; }
  sleep 1
done
python3 "$root/scripts/adherence.py" --url "http://127.0.0.1:$port" "$@"
