#!/usr/bin/env bash
# Re-runs the worked examples (examples/*/) end to end on a fresh itamaed: each is trained through
# the jobs API by examples/run.sh (method and shape from its hparams; epochs, batch size and
# learning rate left to "auto" unless the hparams set them), then evaluated by
# examples/evaluate.sh (base vs tuned answers, validation losses). Ends with one summary line per
# example: the resolved hyperparameters, steps, validation loss base -> tuned and the tuned
# variant's validation token accuracy. These are the figures in docs/examples.md and README.md.
#
#   scripts/run-examples.sh [NAME...]     (default: every example)
#
# Slow: four 40-70 step jobs plus 2 x 36 greedy answers, 15-60 minutes on 2 cores.
# Environment: ITAMAED / CARGO_TARGET_DIR / ITAMAE_MODEL (see scripts/lib.sh); ITAMAE (the CLI,
# default the itamae next to itamaed, built when missing); ITAMAE_EXAMPLES_OUT (default
# /tmp/itamae-examples: per example watch.json, job.json, eval.txt); ITAMAE_EXAMPLES_PORT
# (default 18090). Exit status: 0 = every job succeeded.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$root"
itamae_model
itamae_bin
cli="${ITAMAE:-$(dirname "$bin")/itamae}"
if [ ! -x "$cli" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/itamae-target}"
  cargo build --release -p itamae-client --bin itamae
  cli="$CARGO_TARGET_DIR/release/itamae"
fi
out="${ITAMAE_EXAMPLES_OUT:-/tmp/itamae-examples}"
mkdir -p "$out"
itamae_serve "${ITAMAE_EXAMPLES_PORT:-18090}" "$(mktemp -d -t itamae-examples-data.XXXXXX)"
export ITAMAE_URL="$url" ITAMAE="$cli" ITAMAED="$bin" ITAMAE_MODEL="$model" ITAMAE_EXAMPLES_OUT="$out"

names=("$@")
[ ${#names[@]} -gt 0 ] || names=($(cd examples && ls -d */ | tr -d /))
failed=0
summary=()
for name in "${names[@]}"; do
  start=$(date +%s)
  mkdir -p "$out/$name"
  if ! "$root/examples/run.sh" "$name" >"$out/$name/eval.txt" 2>"$out/$name.log"; then
    echo "$name: FAILED (see $out/$name.log)" >&2
    summary+=("$name: FAILED")
    failed=1
    continue
  fi
  secs=$(( $(date +%s) - start ))
  job="$out/$name/job.json"
  id=$(jq -r .id "$job")
  hp=$(jq -r '.hyperparameters | "epochs \(.n_epochs), batch \(.batch_size), lr x\(.learning_rate_multiplier)"' "$job")
  method=$(. "examples/$name/hparams"; echo "$METHOD")
  # The last eval event (newest first in the API) holds the step count and token accuracy.
  last=$(curl -fsS "$url/v1/fine_tuning/jobs/$id/events?limit=1000" |
    jq -c '[.data[] | select(.data.valid_loss? != null) | .data] | max_by(.step)')
  losses=$(tail -n 1 "$out/$name/eval.txt" | sed 's/^validation loss: //')
  summary+=("$name: $method, $hp, $(jq -r .step <<<"$last") steps, validation loss $losses, \
token accuracy $(jq -r '.valid_mean_token_accuracy * 1000 | round / 1000' <<<"$last"), ${secs}s")
  echo "${summary[-1]}" >&2
done
echo
echo "== summary ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%s\n' "${summary[@]}"
exit "$failed"
