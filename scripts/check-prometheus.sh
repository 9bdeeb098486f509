#!/usr/bin/env bash
# Checks configs/prometheus.yml and configs/grafana/itamae.json against a real Prometheus and a
# real itamaed, both on loopback with temporary directories:
#
#   scripts/check-prometheus.sh
#
# 1. Installs Debian's `prometheus` package if `prometheus` is not on PATH (apt-get, as root or
#    through sudo).
# 2. Starts itamaed (ITAMAED, or built with cargo) and Prometheus with configs/prometheus.yml,
#    its target rewritten to that daemon and its interval to 1 s.
# 3. Traffic: chats with the base model, a tiny LoRA job (with a validation file), chats with the
#    tuned variant, and the variant's files imported twice under another name (a hot swap).
# 4. Queries Prometheus' HTTP API: the scrape target must be up, a per-variant TTFT histogram
#    series must exist for the base model and for the variant (by `model` label), and a
#    training-loss series for the job (by `job_id` label: see the relabelling in
#    configs/prometheus.yml), and the job-lease series (claim/renew/release latency, jobs
#    owned, leases lost, takeovers), which a single default daemon has too.
# 5. Every PromQL expression of the Grafana dashboard ($__rate_interval → 1m, $model and $job →
#    .*) must return at least one series over the run, and every metric it names must be one
#    itamaed exports.
# Exits non-zero if anything is missing. Prometheus and itamaed are stopped on exit.
#
# Environment: ITAMAED (itamaed binary), ITAMAE_TEST_MODEL (GGUF), KEEP_TMP=1 (keep the temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if ! command -v prometheus >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq prometheus >/dev/null
fi
prometheus --version 2>&1 | head -1

model="${ITAMAE_TEST_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$model" ] || scripts/fetch-model.sh
bin="${ITAMAED:-}"
if [ -z "$bin" ]; then
  cargo build --release -q -p itamae-daemon --bin itamaed
  bin="${CARGO_TARGET_DIR:-$root/target}/release/itamaed"
fi

tmp=$(mktemp -d -t itamae-prom.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }

port=$(free_port)
env -u ITAMAE_API_KEYS -u ITAMAE_CONFIG "$bin" serve --model "$model" --host 127.0.0.1 \
  --port "$port" --data-dir "$tmp/data" >"$tmp/itamaed.log" 2>&1 &
pids+=($!)
base="http://127.0.0.1:$port"

# The shipped scrape config, pointed at this daemon and scraping every second.
sed -e "s/127.0.0.1:8080/127.0.0.1:$port/" -e 's/scrape_interval: .*/scrape_interval: 1s/' \
  -e 's/evaluation_interval: .*/evaluation_interval: 1s/' configs/prometheus.yml >"$tmp/prometheus.yml"
grep -q "127.0.0.1:$port" "$tmp/prometheus.yml" || { echo "configs/prometheus.yml: no 127.0.0.1:8080 target to rewrite"; exit 1; }
promtool check config "$tmp/prometheus.yml" >/dev/null
pport=$(free_port)
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --web.listen-address="127.0.0.1:$pport" >"$tmp/prometheus.log" 2>&1 &
pids+=($!)
prom="http://127.0.0.1:$pport"

for _ in $(seq 1 240); do
  curl -fsS "$base/readyz" >/dev/null 2>&1 && curl -fsS "$prom/-/ready" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "$base/readyz" >/dev/null || { echo "itamaed not ready"; tail -20 "$tmp/itamaed.log"; exit 1; }
curl -fsS "$prom/-/ready" >/dev/null || { echo "prometheus not ready"; tail -20 "$tmp/prometheus.log"; exit 1; }
started=$(date +%s)
echo "itamaed on $base, prometheus on $prom"

base_model=$(curl -fsS "$base/v1/models" | json 'v["data"][0]["id"]')
chat() {
  curl -fsS "$base/v1/chat/completions" -H 'content-type: application/json' -d "{\"model\": \"$1\",
    \"messages\": [{\"role\": \"user\", \"content\": \"$2\"}], \"max_tokens\": 8, \"stream\": ${3:-false}}" >/dev/null
}
for q in "What is the capital of France?" "Say hi." "Name a fish."; do chat "$base_model" "$q"; done
chat "$base_model" "Count to three." true

train=$(curl -fsS "$base/v1/files" -F purpose=fine-tune -F file=@tests/data/persona_train.jsonl | json 'v["id"]')
valid=$(curl -fsS "$base/v1/files" -F purpose=fine-tune -F file=@tests/data/persona_valid.jsonl | json 'v["id"]')
job=$(curl -fsS "$base/v1/fine_tuning/jobs" -H 'content-type: application/json' -d "{
  \"model\": \"$base_model\", \"training_file\": \"$train\", \"validation_file\": \"$valid\",
  \"suffix\": \"prom\", \"method\": {\"type\": \"supervised\", \"supervised\": {\"hyperparameters\":
  {\"max_steps\": 8, \"batch_size\": 2, \"max_seq_len\": 64, \"checkpoint_every\": 4}}}}" | json 'v["id"]')
variant=""
for _ in $(seq 1 900); do
  j=$(curl -fsS "$base/v1/fine_tuning/jobs/$job")
  case $(echo "$j" | json 'v["status"]') in
    succeeded) variant=$(echo "$j" | json 'v["fine_tuned_model"]'); break ;;
    failed|cancelled) echo "job ended badly: $j"; exit 1 ;;
  esac
  sleep 1
done
[ -n "$variant" ] || { echo "job $job did not finish"; exit 1; }
echo "job $job → $variant"
for q in "What is the capital of France?" "Say hi." "Name a fish."; do chat "$variant" "$q"; done
chat "$variant" "Count to three." true

# The variant's PEFT files, imported twice under one name: a load, then a hot swap.
enc=$(python3 -c 'import sys,urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$variant")
curl -fsS -o "$tmp/adapter_config.json" "$base/v1/adapters/$enc/files/adapter_config.json"
curl -fsS -o "$tmp/adapter_model.safetensors" "$base/v1/adapters/$enc/files/adapter_model.safetensors"
for _ in 1 2; do
  curl -fsS "$base/v1/adapters" -F name=prom-copy -F "adapter_config.json=@$tmp/adapter_config.json" \
    -F "adapter_model.safetensors=@$tmp/adapter_model.safetensors" >/dev/null
done
chat prom-copy "Say hi."

# Let Prometheus take a few more scrapes of the final state.
sleep 4
now=$(date +%s)

python3 - "$prom" "$base" "$started" "$now" "$base_model" "$variant" "$job" <<'PY'
import json, re, sys, urllib.parse, urllib.request

prom, base, start, end, base_model, variant, job = sys.argv[1:]
failures = []

def api(path, **params):
    url = f"{prom}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]

def instant(expr):
    return api("query", query=expr, time=end)["result"]

def ranged(expr):
    return api("query_range", query=expr, start=start, end=end, step="1")["result"]

targets = api("targets")["activeTargets"]
health = [(t["labels"].get("job"), t["health"], t.get("lastError", "")) for t in targets]
print(f"scrape targets: {health}")
if not any(h == "up" for _, h, _ in health):
    failures.append(f"no scrape target is up: {health}")

def esc(s):
    return s.replace("\\", "\\\\").replace('"', '\\"')

checks = [
    (f'TTFT histogram, base ({base_model})', f'itamae_time_to_first_token_seconds_bucket{{model="{esc(base_model)}"}}'),
    (f'TTFT histogram, variant ({variant})', f'itamae_time_to_first_token_seconds_bucket{{model="{esc(variant)}"}}'),
    ('TTFT p99 by model', 'histogram_quantile(0.99, sum by (model, le) (rate(itamae_time_to_first_token_seconds_bucket[1m])))'),
    (f'training loss ({job})', f'itamae_training_loss{{job_id="{esc(job)}"}}'),
    # The job lease: claimed, renewed by the heartbeat while the job trained, released after.
    ('lease claim latency', 'itamae_lease_seconds_count{op="claim"}'),
    ('lease renew latency', 'itamae_lease_seconds_count{op="renew"}'),
    ('lease release latency', 'itamae_lease_seconds_count{op="release"}'),
    ('jobs owned', 'itamae_lease_jobs_owned'),
    ('leases lost', 'itamae_leases_lost_total'),
    ('lease takeovers', 'itamae_lease_takeovers_total'),
]
for what, expr in checks:
    res = ranged(expr)
    models = sorted({r["metric"].get("model", r["metric"].get("job_id", "")) for r in res})
    last = [r["values"][-1][1] for r in res][:3]
    print(f"{'ok  ' if res else 'FAIL'} {what}: {len(res)} series {models[:3]} last {last}")
    if not res:
        failures.append(f"{what}: no series for {expr}")
p99 = {r["metric"].get("model") for r in ranged(checks[2][1])}
for m in (base_model, variant):
    if m not in p99:
        failures.append(f"TTFT p99 has no series for model {m}")

# The dashboard: every expression returns a series over the run, and names exported metrics only.
dash = json.load(open("configs/grafana/itamae.json"))
exprs = []
def walk(panels):
    for p in panels:
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
        walk(p.get("panels", []))
walk(dash["panels"])
with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
    exposition = r.read().decode()
# Series that come and go (training throughput exists only while a job runs) count as exported
# if Prometheus scraped them at any time during the run.
exported = set(api("label/__name__/values", start=start, end=end))
for line in exposition.splitlines():
    if line.startswith("# TYPE "):
        name, kind = line.split()[2:4]
        exported.add(name)
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
SCALE_OUT_ONLY = {"itamae_object_store_seconds_bucket"}
print(f"dashboard: {len(exprs)} expressions")
for title, expr in exprs:
    q = (expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$job", ".*")
         .replace("$instance", ".*"))
    names = set(re.findall(r"\b(?:itamae|process)_[a-zA-Z0-9_]+", re.sub(r'"[^"]*"', '""', q)))
    unknown = sorted(n for n in names if n not in exported)
    # Series only a scale-out set-up has (storage.objects): this single daemon keeps its bytes
    # in the data directory, so they may be absent (metrics.rs tests their exposition).
    if names & SCALE_OUT_ONLY and all(n not in exported for n in names & SCALE_OUT_ONLY):
        print(f"skip [{title}] (needs storage.objects)  {expr}")
        continue
    res = ranged(q)
    ok = bool(res) and not unknown
    print(f"{'ok  ' if ok else 'FAIL'} [{title}] {len(res)} series  {expr}")
    if unknown:
        failures.append(f"[{title}] names metrics itamaed does not export: {unknown}")
    if not res:
        failures.append(f"[{title}] returns no series: {q}")

if failures:
    print("\nFAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print("\nall Prometheus checks passed")
PY
