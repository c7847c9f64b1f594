#!/usr/bin/env bash
# Create .venv with sim_diffusers and its train/test/eval extras. Idempotent: re-running is a no-op when nothing
# changed. Without a GPU it installs a CPU build of torch first, so that pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q torch
  else
    # 2.13.0 is the CPU build this project is developed and tested with.
    .venv/bin/pip install -q "torch==2.13.0"
  fi
fi
stamp=.venv/.sim_diffusers-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".[train,test,eval]"
  touch "$stamp"
fi
