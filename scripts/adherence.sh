#!/usr/bin/env bash
# `auto` hyperparameters reach the persona: a 20-example greeting + signature dataset trained
# through the jobs API with no hyperparameters, for LoRA, prompt tuning and prefix tuning; each
# variant must carry both on >= 90% of held-out prompts (greedy). Too slow for CI (three
# 60-step jobs): run it by hand. Exit status: 0 = every method reached the bar.
#
# Environment: CARGO_TARGET_DIR / ITAMAED / ITAMAE_MODEL (see scripts/lib.sh),
# ITAMAE_ADHERENCE_PORT (default 18089). Extra arguments go to adherence.py (--methods, --min).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$root"
itamae_model
itamae_bin
itamae_serve "${ITAMAE_ADHERENCE_PORT:-18089}" "$(mktemp -d -t itamae-adherence.XXXXXX)"
python3 "$root/scripts/adherence.py" --url "$url" "$@"
