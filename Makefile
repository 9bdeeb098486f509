# The two set-up commands: `make serve` (fetch the default model, build, run itamaed on
# 127.0.0.1:8080) and `make test` (fetch the model, run every test; real-model ones need release).
CARGO_TARGET_DIR ?= $(HOME)/.cache/itamae-target
export CARGO_TARGET_DIR

.PHONY: serve test model system system-test validate-deploy bench bench-train bench-batch bench-job-swap lint check-prometheus schemathesis docker-steps peft-interop

serve: system model
	cargo run --release -p itamae-daemon --bin itamaed -- serve --config configs/itamae.toml

# One throwaway PostgreSQL for the whole run (stopped when this recipe's shell exits).
test: system-test model
	@scripts/services/s3.sh start --shared --owner $$PPID >/dev/null
	url=$$(scripts/services/postgres.sh start --watch-pid $$$$) && \
	  ITAMAE_TEST_PG_URL=$$url cargo test --release --workspace

model:
	@scripts/fetch-model.sh

# Debian packages the build links against (OpenBLAS); idempotent.
system:
	@scripts/setup-system.sh

# The same plus what the tests drive (chromium, for the console's browser test).
system-test:
	@scripts/setup-system.sh test

# Benchmarks let OpenBLAS pick the kernels this CPU supports even where the environment pins an
# older core type (blas::ensure_coretype_env; the result is self-checked before use).
bench: system model
	ITAMAE_OPENBLAS_CORETYPE=auto cargo run --release -p itamae-daemon --bin itamae-bench -- decode

bench-train: system model
	ITAMAE_OPENBLAS_CORETYPE=auto cargo run --release -p itamae-daemon --bin itamae-bench -- train

bench-batch: system model
	ITAMAE_OPENBLAS_CORETYPE=auto cargo run --release -p itamae-daemon --bin itamae-bench -- batch

bench-job-swap: system model
	ITAMAE_OPENBLAS_CORETYPE=auto cargo run --release -p itamae-daemon --bin itamae-bench -- job-swap

validate-deploy:
	scripts/validate-deploy.sh

lint: system
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings
	scripts/validate-deploy.sh

# Developer checks that need more than CI has (a venv from PyPI, a Debian package, a live daemon).
check-prometheus: system model
	scripts/check-prometheus.sh

schemathesis: system model
	scripts/schemathesis.sh

docker-steps: system model
	scripts/docker-steps.sh

peft-interop: system model
	scripts/peft-interop.sh
