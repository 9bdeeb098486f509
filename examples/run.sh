#!/usr/bin/env bash
# Trains one worked example on a running itamaed with the itamae CLI, then evaluates it
# (evaluate.sh): the base model's and the tuned variant's answers to the held-out prompts side by
# side, and the validation loss of each.
#
#   examples/run.sh NAME        NAME: house-style | brand-voice | company-faq | aviation-jargon
#
# ITAMAE_URL (default http://127.0.0.1:8080) and ITAMAE_API_KEY reach the daemon; ITAMAE picks
# the CLI binary (default: itamae on PATH). The job's JSON is kept in
# ${ITAMAE_EXAMPLES_OUT:-examples/.runs}/NAME/job.json for evaluate.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
load_example "${1:-}"
name=$1
export ITAMAE_URL=${ITAMAE_URL:-http://127.0.0.1:8080}
itamae=${ITAMAE:-itamae}
out=${ITAMAE_EXAMPLES_OUT:-$examples_dir/.runs}/$name
mkdir -p "$out"

args=(jobs create --file "$ex_dir/train.jsonl" --validation-file "$ex_dir/valid.jsonl"
      --method "$METHOD" --suffix "$name")
[ -n "$EPOCHS" ] && args+=(--epochs "$EPOCHS")
[ -n "$BATCH_SIZE" ] && args+=(--batch-size "$BATCH_SIZE")
[ -n "$LR_MULT" ] && args+=(--learning-rate-multiplier "$LR_MULT")
[ -n "$R" ] && args+=(--r "$R")
[ -n "$NUM_VIRTUAL_TOKENS" ] && args+=(--num-virtual-tokens "$NUM_VIRTUAL_TOKENS")
echo "training $name ($METHOD, ${EPOCHS:-auto} epochs) on $ITAMAE_URL" >&2
"$itamae" "${args[@]}" --watch --json >"$out/watch.json"
# --watch --json ends with the job object; keep the last JSON value that is a job.
jq -s 'map(select(type == "object" and .object == "fine_tuning.job")) | last' \
    "$out/watch.json" >"$out/job.json"
status=$(jq -r '.status // "unknown"' "$out/job.json")
model=$(jq -r '.fine_tuned_model // empty' "$out/job.json")
if [ "$status" != succeeded ] || [ -z "$model" ]; then
    echo "job did not succeed (status $status): $(jq -c '.error' "$out/job.json")" >&2
    exit 1
fi
echo "tuned model: $model" >&2
exec "$examples_dir/evaluate.sh" "$name" "$model"
