#!/usr/bin/env bash
# Run the test suite (hermetic tiny-model tests plus a few real SmolLM2 tests) with the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
