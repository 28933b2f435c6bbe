#!/usr/bin/env bash
# One-command setup: creates .venv and installs this project into it (editable, from
# pyproject.toml) with its test tools; console scripts unified-extract, unified-inference,
# unified-train and unified-train-example land in .venv/bin.
#   bash setup.sh            # runtime + tests/benchmarks (pip install -e ".[dev]")
#   bash setup.sh --runtime  # runtime only       (pip install -e .)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--runtime" ]; then
  .venv/bin/python -m pip install --quiet -e .
else
  .venv/bin/python -m pip install --quiet -e ".[dev]"
fi
.venv/bin/python -c "import torch, av; from unified_model import create_unified_model; print('setup ok: torch', torch.__version__, '| PyAV', av.__version__)"
