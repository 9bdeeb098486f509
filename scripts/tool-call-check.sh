#!/usr/bin/env bash
# Tool-call and structured-output check with the unmodified `openai` Python SDK against itamaed
# serving the real Qwen2.5-Coder-0.5B-Instruct GGUF (its chat template prints tools): a round trip
# call → tool result → final answer (tool_choice "required" forces the call by grammar, then
# "auto" for the answer), the same call streamed (tool-call deltas reassembled), and a
# json_schema response validated. Exit status: 0 = every step passed.
#
# Environment:
#   ITAMAE_URL        target this running daemon instead of starting one (it must serve a model
#                     whose template supports tools)
#   ITAMAE_API_KEY    key to send (default "unused")
#   ITAMAE_SDK_VENV   venv to create/reuse     (default $HOME/.cache/itamae/sdkvenv)
#   CARGO_TARGET_DIR  cargo target dir         (default $HOME/.cache/itamae-target)
#   ITAMAED           use this itamaed binary and skip the cargo build
#   ITAMAE_TOOL_MODEL GGUF to serve            (default models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf,
#                     fetched by scripts/fetch-model.sh qwen2.5-coder)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

. "$root/scripts/sdk-venv.sh"

url="${ITAMAE_URL:-}"
if [ -z "$url" ]; then
  model="${ITAMAE_TOOL_MODEL:-$root/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf}"
  [ -f "$model" ] || "$root/scripts/fetch-model.sh" qwen2.5-coder
  bin="${ITAMAED:-}"
  if [ -z "$bin" ]; then
    target="${CARGO_TARGET_DIR:-$HOME/.cache/itamae-target}"
    CARGO_TARGET_DIR="$target" cargo build --release -q -p itamae-daemon --bin itamaed
    bin="$target/release/itamaed"
  fi
  work="$(mktemp -d)"
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  env -u ITAMAE_API_KEYS -u ITAMAE_CONFIG "$bin" serve --model "$model" --host 127.0.0.1 \
    --port "$port" >"$work/itamaed.log" 2>&1 &
  pid=$!
  stop() {
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$work"
  }
  trap stop EXIT
  url="http://127.0.0.1:$port"
  for _ in $(seq 1 480); do
    curl -sf "$url/readyz" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/itamaed.log"; exit 1; }
    sleep 0.5
  done
  echo "itamaed started at $url (log: $work/itamaed.log)"
fi

ITAMAE_URL="$url" "$py" - <<'PY'
import json, os, sys
from openai import OpenAI

client = OpenAI(base_url=os.environ["ITAMAE_URL"] + "/v1",
                api_key=os.environ.get("ITAMAE_API_KEY", "unused"))
model = client.models.list().data[0].id
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}]
messages = [{"role": "user", "content": "What is the weather in Kyoto, in celsius?"}]

def step(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        sys.exit(1)

r = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                   tool_choice="required", temperature=0, max_tokens=100)
c = r.choices[0]
calls = c.message.tool_calls or []
step("forced call", c.finish_reason == "tool_calls" and len(calls) >= 1, f"{c.finish_reason} {calls}")
call = calls[0]
args = json.loads(call.function.arguments)
step("call shape", call.id.startswith("call_") and call.function.name == "get_weather"
     and isinstance(args.get("city"), str), call.function.arguments)

messages.append({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
messages.append({"role": "tool", "tool_call_id": call.id,
                 "content": json.dumps({"city": args["city"], "temperature": 21, "sky": "sunny"})})
r = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                   tool_choice="auto", temperature=0, max_tokens=80)
# The tool result went through the template as a `tool` message; what the model makes of it is
# its own business (the 0.5B coder model tends to repeat the call as bare JSON), so this step
# checks the exchange, and prints the answer for a human to judge.
final = r.choices[0]
step("final answer", final.finish_reason in ("stop", "length", "tool_calls")
     and bool(final.message.content or final.message.tool_calls),
     f"{final.finish_reason}: {final.message.content!r} {final.message.tool_calls or ''}")

# Streamed: deltas carry index, id, type and name, then argument pieces.
stream = client.chat.completions.create(model=model, messages=messages[:1], tools=tools,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        temperature=0, max_tokens=100, stream=True)
acc, finish = {}, None
for chunk in stream:
    if not chunk.choices:
        continue
    ch = chunk.choices[0]
    for d in ch.delta.tool_calls or []:
        slot = acc.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
        slot["id"] = slot["id"] or d.id
        if d.function and d.function.name:
            slot["name"] += d.function.name
        if d.function and d.function.arguments:
            slot["arguments"] += d.function.arguments
    finish = ch.finish_reason or finish
step("streamed call", finish == "tool_calls" and acc.get(0, {}).get("name") == "get_weather"
     and isinstance(json.loads(acc[0]["arguments"]).get("city"), str), str(acc))

schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}
r = client.chat.completions.create(model=model, temperature=0, max_tokens=60,
                                   messages=[{"role": "user", "content": "Kyoto and its population as JSON."}],
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "city", "strict": True, "schema": schema}})
out = json.loads(r.choices[0].message.content)
step("json_schema", set(out) == {"city", "population"} and isinstance(out["population"], int), str(out))
print("tool-call check passed")
PY
