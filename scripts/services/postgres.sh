#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster for the tests (Debian's `postgresql-15`, installed by
# `scripts/setup-system.sh test`): initdb in a temp dir, trust auth, loopback only, a free port.
#
#   postgres.sh start [--watch-pid PID]   start a cluster, print its URL on stdout
#                                          (with --watch-pid: stopped and removed once PID exits)
#   postgres.sh url                        the URL of the cluster `start` left running
#   postgres.sh stop                       stop it and remove its directory
#
# PostgreSQL refuses to run as root, so under root the server runs as the `postgres` system user.
# The state of the last `start` is kept in $ITAMAE_PG_STATE (default /tmp/itamae-pg-<uid>.state).
set -euo pipefail

bin=/usr/lib/postgresql/15/bin
state="${ITAMAE_PG_STATE:-${TMPDIR:-/tmp}/itamae-pg-$(id -u).state}"

as_server_user() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

stop_dir() {
  local dir="$1"
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_server_user "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
}

start() {
  local watch=""
  if [ "${1:-}" = --watch-pid ]; then
    watch="${2:?--watch-pid needs a pid}"
  fi
  if [ ! -x "$bin/initdb" ]; then
    echo "error: $bin/initdb not found; run scripts/setup-system.sh test (Debian postgresql-15)" >&2
    exit 1
  fi
  local dir
  dir="$(mktemp -d "${TMPDIR:-/tmp}/itamae-pg.XXXXXX")"
  chmod 755 "$dir"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$dir"
  fi
  as_server_user "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync \
    >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2
    exit 1
  }
  local port tries=0
  while :; do
    port=$((20000 + RANDOM % 40000))
    if port_free "$port" &&
      as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
        start >/dev/null 2>&1; then
      break
    fi
    tries=$((tries + 1))
    if [ "$tries" -ge 5 ]; then
      cat "$dir/server.log" >&2 || true
      rm -rf "$dir"
      echo "error: the PostgreSQL server did not start" >&2
      exit 1
    fi
  done
  local url="postgres://postgres@127.0.0.1:$port/postgres"
  if [ -z "$watch" ]; then
    printf '%s\n%s\n' "$dir" "$url" >"$state"
  else
    # Detached from the caller's stdout so the caller's read of the URL ends.
    setsid bash -c '
      while kill -0 "$1" 2>/dev/null; do sleep 1; done
      "$2" stop-dir "$3"
    ' _ "$watch" "$0" "$dir" </dev/null >/dev/null 2>&1 &
  fi
  echo "$url"
}

case "${1:-}" in
start)
  shift
  start "$@"
  ;;
url)
  [ -f "$state" ] || {
    echo "error: no cluster started" >&2
    exit 1
  }
  sed -n 2p "$state"
  ;;
stop)
  if [ -f "$state" ]; then
    stop_dir "$(sed -n 1p "$state")"
    rm -f "$state"
  fi
  ;;
stop-dir)
  stop_dir "${2:?}"
  ;;
*)
  echo "usage: $0 start [--watch-pid PID] | url | stop" >&2
  exit 2
  ;;
esac
