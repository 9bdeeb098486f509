#!/usr/bin/env bash
# Base model vs tuned variant on one worked example, through a running itamaed: the greedy
# answers to every held-out prompt (examples/NAME/prompts.txt) side by side, then the validation
# loss of each on examples/NAME/valid.jsonl.
#
#   examples/evaluate.sh NAME [MODEL]
#
# MODEL is the tuned variant (`ft:...`); by default the one run.sh last trained for NAME.
# Validation losses: the tuned one is the job's final eval (its events, over the API); the base
# one comes from `itamaed eval` on the same file — the same measure on the same tokens
# (tests/examples_data.rs checks that the two agree). It needs the base model file locally
# (ITAMAE_MODEL, default models/SmolLM2-135M-Instruct.Q4_1.gguf); without it, that figure
# reads "n/a".
set -euo pipefail
. "$(dirname "$0")/lib.sh"
load_example "${1:-}"
name=$1
export ITAMAE_URL=${ITAMAE_URL:-http://127.0.0.1:8080}
itamae=${ITAMAE:-itamae}
job_json=${ITAMAE_EXAMPLES_OUT:-$examples_dir/.runs}/$name/job.json
model=${2:-}
if [ -z "$model" ]; then
    [ -f "$job_json" ] || { echo "no MODEL given and no $job_json: run examples/run.sh $name" >&2; exit 2; }
    model=$(jq -r '.fine_tuned_model' "$job_json")
fi
# Tuned names are ft:{base}:{org}:{suffix}:{job id}.
IFS=: read -r ft base _ _ job_id <<<"$model"
if [ "$ft" != ft ] || [ -z "$base" ] || [ -z "$job_id" ]; then
    echo "'$model' is not a tuned model name (ft:BASE:ORG:SUFFIX:JOB)" >&2
    exit 2
fi
job_id=${job_id%%:*} # a checkpoint (…:ckpt-step-N) belongs to its job

while IFS= read -r prompt; do
    [ -z "$prompt" ] && continue
    base_answer=$("$itamae" chat -m "$base" -p "$prompt" --max-tokens "$MAX_TOKENS" --temperature 0 </dev/null)
    tuned_answer=$("$itamae" chat -m "$model" -p "$prompt" --max-tokens "$MAX_TOKENS" --temperature 0 </dev/null)
    side_by_side "$prompt" "$base_answer" "$tuned_answer"
done <"$ex_dir/prompts.txt"

tuned_loss=$(job_valid_loss "$job_id")
base_loss=n/a
if itamaed=$(find_itamaed 2>/dev/null); then
    base_loss=$(cd "$repo_dir" && "$itamaed" eval --data "$ex_dir/valid.jsonl" --json |
        jq -r '.loss * 10000 | round / 10000')
fi
print_losses "$base_loss" "$tuned_loss"
