# Shared by run.sh, evaluate.sh and local.sh (sourced, not run).

examples_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$examples_dir/.." && pwd)

# Loads examples/<name>/hparams into METHOD, EPOCHS, BATCH_SIZE, LR_MULT, R, NUM_VIRTUAL_TOKENS,
# MAX_TOKENS. Empty EPOCHS, BATCH_SIZE and LR_MULT mean "auto".
load_example() {
    local name=$1
    if [ -z "$name" ] || [ ! -f "$examples_dir/$name/hparams" ]; then
        echo "unknown example '$name'; one of:" \
            $(cd "$examples_dir" && ls -d */ | tr -d /) >&2
        exit 2
    fi
    METHOD= EPOCHS= BATCH_SIZE= LR_MULT= R= NUM_VIRTUAL_TOKENS= MAX_TOKENS=
    # shellcheck disable=SC1090
    . "$examples_dir/$name/hparams"
    : "${METHOD:?hparams: METHOD missing}"
    MAX_TOKENS=${MAX_TOKENS:-96}
    ex_dir="$examples_dir/$name"
}

# The itamaed binary for `itamaed eval` (and the one-shot path): $ITAMAED, then PATH, then the
# workspace's release build.
find_itamaed() {
    if [ -n "${ITAMAED:-}" ]; then echo "$ITAMAED"
    elif command -v itamaed >/dev/null; then command -v itamaed
    elif [ -x "${CARGO_TARGET_DIR:-$repo_dir/target}/release/itamaed" ]; then
        echo "${CARGO_TARGET_DIR:-$repo_dir/target}/release/itamaed"
    else
        echo "itamaed not found: set ITAMAED, put it on PATH, or cargo build --release" >&2
        return 1
    fi
}

# side_by_side PROMPT BASE_ANSWER TUNED_ANSWER: two wrapped columns under the prompt.
side_by_side() {
    local width=${COLUMNS:-160} col a b
    col=$(( (width - 3) / 2 ))
    a=$(mktemp) b=$(mktemp)
    { echo "BASE"; echo "$2"; } | fold -s -w "$col" >"$a"
    { echo "TUNED"; echo "$3"; } | fold -s -w "$col" >"$b"
    echo "=== $1"
    pr -m -t -w "$width" -S" | " "$a" "$b" | expand | sed "s/ *$//"
    echo
    rm -f "$a" "$b"
}

# job_valid_loss JOB_ID: the validation loss of a job's last eval, from its events (OpenAI's
# GET /v1/fine_tuning/jobs/{id}/events, newest first), or "n/a" when it has none.
job_valid_loss() {
    local auth=()
    [ -n "${ITAMAE_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $ITAMAE_API_KEY")
    curl -fsS "${auth[@]}" "$ITAMAE_URL/v1/fine_tuning/jobs/$1/events?limit=1000" |
        jq -r '[.data[] | select(.data.valid_loss? != null) | .data] | max_by(.step) | .valid_loss
               | if . == null then "n/a" else (. * 10000 | round / 10000) end'
}

# print_losses BASE_LOSS TUNED_LOSS: the validation-loss line every evaluation ends with.
print_losses() {
    echo "validation loss: base $1 -> tuned $2"
}
