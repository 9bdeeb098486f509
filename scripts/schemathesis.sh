#!/usr/bin/env bash
# Fuzzes a running itamaed against openapi/openapi.yaml with schemathesis (PyPI).
#
#   scripts/schemathesis.sh [extra schemathesis args...]
#
# Makes (or reuses) its own venv, starts itamaed on a free loopback port with a temporary data
# directory (no API keys), and runs schemathesis' stateless phases (examples, coverage, fuzzing)
# with the checks not_a_server_error, status_code_conformance, content_type_conformance,
# response_schema_conformance and response_headers_conformance, twice: pass 1 with path ids
# generated from the spec's patterns, pass 2 with the ids of real resources made first (an
# uploaded dataset, a finished 2-step LoRA job, its adapter). Prints schemathesis' summaries and
# fails if either pass fails, or if the daemon panicked or stopped answering. The daemon is
# stopped and the temp dir removed on exit.
#
# Environment:
#   ITAMAED             itamaed binary to run (default: build it with cargo, release)
#   ITAMAE_TEST_MODEL   GGUF to serve (default models/SmolLM2-135M-Instruct.Q4_1.gguf)
#   ST_MAX_EXAMPLES     test cases per operation in the fuzzing phase (default 30)
#   ST_VENV             venv directory (default ~/.cache/itamae/schemathesis-venv)
#   ST_VERSION          schemathesis version spec for pip (default ">=4,<5")
#   ST_SEED             seed of the run (default 1)
#   ST_REPORT_DIR       keep the JUnit and HAR reports there (default: a temp dir, removed)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

venv="${ST_VENV:-$HOME/.cache/itamae/schemathesis-venv}"
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis${ST_VERSION:->=4,<5}"
fi
"$venv/bin/schemathesis" --version

model="${ITAMAE_TEST_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$model" ] || scripts/fetch-model.sh
bin="${ITAMAED:-}"
if [ -z "$bin" ]; then
  cargo build --release -q -p itamae-daemon --bin itamaed
  bin="${CARGO_TARGET_DIR:-$root/target}/release/itamaed"
fi

tmp=$(mktemp -d -t itamae-st.XXXXXX)
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# No API keys: every route is open on loopback, so the fuzzer reaches the handlers themselves.
env -u ITAMAE_API_KEYS -u ITAMAE_CONFIG "$bin" serve --model "$model" --host 127.0.0.1 \
  --port "$port" --data-dir "$tmp/data" >"$tmp/itamaed.log" 2>&1 &
pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 240); do
  curl -fsS "$base/readyz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { echo "itamaed exited:"; cat "$tmp/itamaed.log"; exit 1; }
  sleep 0.5
done
curl -fsS "$base/readyz" >/dev/null || { echo "itamaed not ready"; tail -20 "$tmp/itamaed.log"; exit 1; }
echo "itamaed ready on $base (log: $tmp/itamaed.log)"

# Generation is CPU-bound: cap what one fuzzed request may generate, so that a run takes
# minutes rather than hours (an absent max_tokens means "to the end of the 8k context").
# Only upper bounds are touched; zero, negative and mistyped values still reach the server.
base_model=$(curl -fsS "$base/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
cat >"$tmp/st_hooks.py" <<'PY'
import os
import random

import schemathesis

CAP = 8
MODEL = os.environ["ST_MODEL"]
random.seed(int(os.environ.get("ST_SEED", "1")))

@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.method != "POST" or case.path not in ("/v1/chat/completions", "/v1/completions"):
        return
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > CAP:
            body[key] = CAP
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = CAP
    # Random model names only meet the 404 path: half the requests name the served model, so
    # that fuzzed sampling parameters, stops and messages reach the engine.
    if isinstance(body.get("model"), str) and random.random() < 0.5:
        body["model"] = MODEL
PY

# Real resources for the second pass: a dataset, a finished tiny job and its adapter.
file_id=$(curl -fsS "$base/v1/files" -F purpose=fine-tune -F file=@tests/data/persona_train.jsonl |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
job_id=$(curl -fsS "$base/v1/fine_tuning/jobs" -H 'content-type: application/json' -d "{
  \"model\": \"$base_model\", \"training_file\": \"$file_id\", \"suffix\": \"st\",
  \"method\": {\"type\": \"supervised\", \"supervised\": {\"hyperparameters\":
  {\"max_steps\": 2, \"batch_size\": 2, \"max_seq_len\": 48}}}}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
variant=""
for _ in $(seq 1 600); do
  job=$(curl -fsS "$base/v1/fine_tuning/jobs/$job_id")
  st=$(echo "$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  case $st in
    succeeded) variant=$(echo "$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)["fine_tuned_model"])'); break ;;
    failed|cancelled) echo "set-up job $st: $job"; exit 1 ;;
  esac
  sleep 1
done
[ -n "$variant" ] || { echo "set-up job did not finish"; exit 1; }
cat >"$tmp/schemathesis.toml" <<TOML
[parameters]
id = "$base_model"
file_id = "$file_id"
fine_tuning_job_id = "$job_id"
adapter_id = "$variant"
TOML
echo "pass 2 resources: file $file_id, job $job_id, adapter $variant"

# Run from the temp dir: hypothesis keeps a .hypothesis/ folder in the working directory.
run_st() {
  (cd "$tmp" && PYTHONPATH="$tmp" SCHEMATHESIS_HOOKS=st_hooks ST_MODEL="$base_model" ST_SEED="${ST_SEED:-1}" \
  "$venv/bin/schemathesis" "$@" run "$root/openapi/openapi.yaml" \
    --url "$base" \
    --phases examples,coverage,fuzzing \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --max-examples "${ST_MAX_EXAMPLES:-30}" \
    --workers 1 \
    --request-timeout 120 \
    --seed "${ST_SEED:-1}" \
    --no-color \
    --generation-database none \
    --report junit,har --report-dir "${ST_REPORT_DIR:-$tmp/report}" \
    "${extra[@]}")
}
extra=("$@")
status=0
echo "=== pass 1: ids generated from the spec ==="
: >"$tmp/empty.toml"
run_st --config-file "$tmp/empty.toml" || status=$?
echo "=== pass 2: ids of real resources ($tmp/schemathesis.toml) ==="
run_st --config-file "$tmp/schemathesis.toml" || status=$?

# The daemon must have survived the fuzzing.
if ! curl -fsS "$base/healthz" >/dev/null; then
  echo "itamaed stopped answering during the run; log tail:"; tail -30 "$tmp/itamaed.log"
  status=1
fi
if grep -q "panicked" "$tmp/itamaed.log"; then
  echo "itamaed panicked during the run:"; grep -A3 "panicked" "$tmp/itamaed.log" | head -20
  status=1
fi
exit "$status"
