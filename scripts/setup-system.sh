#!/usr/bin/env bash
# Installs the Debian packages the build links against: the system OpenBLAS (`libopenblas-dev`,
# linked by daemon/src/ops/blas.rs). With the argument `test` it also installs what the tests use:
# `chromium`, the headless browser that tests/console_browser.rs drives over the DevTools protocol
# to test the web console, and `postgresql-15`, whose initdb/pg_ctl make the throwaway clusters
# (scripts/services/postgres.sh) the PostgreSQL storage tests run against (serving never needs
# either, so `make serve` does not install them).
# Idempotent: does nothing when every package is already installed.
set -euo pipefail

packages=(libopenblas-dev)
if [ "${1:-}" = test ]; then
  packages+=(chromium postgresql-15)
fi

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
  done
else
  missing=("${packages[@]}")
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages present: ${packages[*]}"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: missing ${missing[*]} and apt-get is not available here." >&2
  echo "       Install OpenBLAS (library and headers, e.g. libopenblas-dev) and Chromium with your package manager." >&2
  exit 1
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo_cmd=(sudo -n)
  else
    echo "error: missing ${missing[*]}; installing needs root." >&2
    echo "       Run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

echo "installing ${missing[*]} ..."
export DEBIAN_FRONTEND=noninteractive
# A fresh image has no package lists: install fails with "Unable to locate package" until update.
if ! "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
  "${sudo_cmd[@]}" apt-get update
  "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi
echo "installed ${missing[*]}"
