# The two set-up commands: `make serve` (fetch the default model, build, run itamaed on
# 127.0.0.1:8080) and `make test` (fetch the model, run every test; real-model ones need release).
CARGO_TARGET_DIR ?= $(HOME)/.cache/itamae-target
export CARGO_TARGET_DIR

.PHONY: serve test model bench lint

serve: model
	cargo run --release -p itamae-daemon --bin itamaed -- serve --config configs/itamae.toml

test: model
	cargo test --release --workspace

model:
	@scripts/fetch-model.sh

bench: model
	cargo run --release -p itamae-daemon --bin itamaed -- bench decode

lint:
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings
