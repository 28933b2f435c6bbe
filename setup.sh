#!/usr/bin/env bash
# One-command setup: creates .venv with the runtime and test dependencies.
#   bash setup.sh            # runtime + tests/benchmarks (open_clip, pytest)
#   bash setup.sh --runtime  # runtime only
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--runtime" ]; then
  .venv/bin/python -m pip install --quiet -r requirements.txt
else
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
fi
.venv/bin/python -c "import torch, av; from unified_model import create_unified_model; print('setup ok: torch', torch.__version__, '| PyAV', av.__version__)"
