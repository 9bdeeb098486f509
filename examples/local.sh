#!/usr/bin/env bash
# The one-shot path, without a daemon: trains examples/<name> with `itamaed train`, then prints
# the base model's and the tuned adapter's greedy answers to the held-out prompts side by side,
# and both validation losses (`itamaed eval`). The figures in docs/examples.md come from here.
#
#   examples/local.sh NAME [OUT_DIR]    (OUT_DIR defaults to /tmp/itamae-examples/NAME)
#
# ITAMAED picks the binary, ITAMAE_MODEL the base model (default: the SmolLM2 GGUF in models/);
# SKIP_TRAIN=1 reuses OUT_DIR's adapter; LIMIT=N asks only the first N held-out prompts.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
load_example "${1:-}"
name=$1
out=${2:-/tmp/itamae-examples/$name}
itamaed=$(find_itamaed)
cd "$repo_dir"

args=(--data "$ex_dir/train.jsonl" --validation-data "$ex_dir/valid.jsonl"
      --method "${METHOD//_/-}" --out "$out")
[ -n "$EPOCHS" ] && args+=(--epochs "$EPOCHS")
[ -n "$BATCH_SIZE" ] && args+=(--batch-size "$BATCH_SIZE")
[ -n "$LR_MULT" ] && args+=(--learning-rate-multiplier "$LR_MULT")
[ -n "$R" ] && args+=(--r "$R")
[ -n "$NUM_VIRTUAL_TOKENS" ] && args+=(--num-virtual-tokens "$NUM_VIRTUAL_TOKENS")
if [ -z "${SKIP_TRAIN:-}" ]; then
    rm -rf "$out"
    "$itamaed" train "${args[@]}"
fi

loss() { "$itamaed" eval --data "$ex_dir/valid.jsonl" --json "$@" | jq -r '.loss * 10000 | round / 10000'; }
base_loss=$(loss)
tuned_loss=$(loss --adapter "$out")
while IFS= read -r prompt; do
    base=$("$itamaed" chat -p "$prompt" --max-tokens "$MAX_TOKENS" --temperature 0 2>/dev/null </dev/null)
    tuned=$("$itamaed" chat --adapter "$out" -p "$prompt" --max-tokens "$MAX_TOKENS" \
        --temperature 0 2>/dev/null </dev/null)
    side_by_side "$prompt" "$base" "$tuned"
done < <(grep -v '^$' "$ex_dir/prompts.txt" | head -n "${LIMIT:-1000}")
print_losses "$base_loss" "$tuned_loss"
