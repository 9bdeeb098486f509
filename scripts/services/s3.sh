#!/usr/bin/env bash
# A real S3-protocol server for the tests: s3s-fs (crates.io) serving a temporary directory on a
# free loopback port, with fixed test credentials and one bucket.
#
#   s3.sh start [--shared] [--owner PID]   start a server; prints its environment (export lines)
#   s3.sh env   [--shared]                 print the environment of a running server
#   s3.sh stop  [--shared]                 stop it and remove its directory
#   s3.sh install                          only install the binary
#
# Without --shared the server's state directory is $ITAMAE_TEST_S3_STATE (printed by start);
# --shared uses one well-known directory, so `make test` starts one server that every test
# binary finds through `s3.sh env --shared`. With --owner the server stops when PID exits (a
# test binary or make that started it cannot always clean up after itself).
#
# The binary is built once into ~/.cache/itamae/tools (override: ITAMAE_TOOLS_DIR), with its own
# CARGO_TARGET_DIR so it never touches the project's build.
set -euo pipefail

S3S_VERSION=0.14.1
TOOLS="${ITAMAE_TOOLS_DIR:-$HOME/.cache/itamae/tools}"
BIN="$TOOLS/bin/s3s-fs"
ACCESS_KEY=itamae-test
SECRET_KEY=itamae-test-secret
BUCKET=itamae-test
REGION=us-east-1
SHARED_STATE="${TMPDIR:-/tmp}/itamae-s3-shared"

cmd="${1:-}"
shift || true
shared=0
owner=""
while [ $# -gt 0 ]; do
    case "$1" in
        --shared) shared=1 ;;
        --owner) owner="$2"; shift ;;
        *) echo "s3.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

install() {
    if [ -x "$BIN" ] && [ "$(cat "$TOOLS/s3s-fs.version" 2>/dev/null)" = "$S3S_VERSION" ]; then
        return
    fi
    mkdir -p "$TOOLS"
    echo "s3.sh: installing s3s-fs $S3S_VERSION into $TOOLS (once)" >&2
    # Its own target dir: the project's build cache and its feature set stay untouched.
    CARGO_TARGET_DIR="$TOOLS/target" cargo install --locked --quiet s3s-fs \
        --version "$S3S_VERSION" --features binary --root "$TOOLS" >&2
    rm -rf "$TOOLS/target"
    echo "$S3S_VERSION" >"$TOOLS/s3s-fs.version"
}

state_dir() {
    if [ "$shared" = 1 ]; then
        echo "$SHARED_STATE"
    elif [ -n "${ITAMAE_TEST_S3_STATE:-}" ]; then
        echo "$ITAMAE_TEST_S3_STATE"
    else
        echo "s3.sh: no server named (set ITAMAE_TEST_S3_STATE or pass --shared)" >&2
        exit 2
    fi
}

running() {
    local dir="$1"
    [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null
}

print_env() {
    local dir="$1" port
    port="$(cat "$dir/port")"
    cat <<EOF
export ITAMAE_TEST_S3_ENDPOINT=http://127.0.0.1:$port
export ITAMAE_TEST_S3_BUCKET=$BUCKET
export ITAMAE_TEST_S3_STATE=$dir
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=$REGION
export AWS_ALLOW_HTTP=true
EOF
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    install
    local dir
    if [ "$shared" = 1 ]; then
        dir="$SHARED_STATE"
        if running "$dir"; then
            print_env "$dir"
            return
        fi
        rm -rf "$dir"
        mkdir -p "$dir"
    else
        dir="$(mktemp -d "${TMPDIR:-/tmp}/itamae-s3.XXXXXX")"
    fi
    mkdir -p "$dir/root/$BUCKET"
    local port tries=0
    while :; do
        port="$(free_port)"
        "$BIN" --host 127.0.0.1 --port "$port" --access-key "$ACCESS_KEY" \
            --secret-key "$SECRET_KEY" "$dir/root" >"$dir/log" 2>&1 &
        echo $! >"$dir/pid"
        echo "$port" >"$dir/port"
        # Ready when it answers HTTP (any status: an unsigned request is refused).
        for _ in $(seq 1 100); do
            if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
                break 2
            fi
            running "$dir" || break
            sleep 0.1
        done
        kill "$(cat "$dir/pid")" 2>/dev/null || true
        tries=$((tries + 1))
        if [ "$tries" -ge 3 ]; then
            echo "s3.sh: s3s-fs did not start; its log:" >&2
            cat "$dir/log" >&2
            exit 1
        fi
    done
    if [ -n "$owner" ]; then
        local pid
        pid="$(cat "$dir/pid")"
        # Detached from our stdout, so a caller reading our output is not kept waiting.
        nohup bash -c "while kill -0 $owner 2>/dev/null && kill -0 $pid 2>/dev/null; do sleep 1; done; kill $pid 2>/dev/null; rm -rf '$dir'" \
            >/dev/null 2>&1 &
    fi
    print_env "$dir"
}

stop() {
    local dir
    dir="$(state_dir)"
    if [ -f "$dir/pid" ]; then
        kill "$(cat "$dir/pid")" 2>/dev/null || true
    fi
    rm -rf "$dir"
}

case "$cmd" in
    install) install ;;
    start) start ;;
    env)
        dir="$(state_dir)"
        if ! running "$dir"; then
            echo "s3.sh: no server running in $dir" >&2
            exit 1
        fi
        print_env "$dir"
        ;;
    stop) stop ;;
    *)
        echo "usage: s3.sh start|env|stop [--shared] [--owner PID] | install" >&2
        exit 2
        ;;
esac
