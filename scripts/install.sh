#!/usr/bin/env bash
# Create .venv (once) and install the project with its dev extras. On a machine without a GPU,
# the CPU build of torch 2.13.0 is installed first so that no multi-GB CUDA build is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/pip install -q "torch>=2.4"
    else
        .venv/bin/pip install -q torch==2.13.0
    fi
fi
.venv/bin/pip install -q -e ".[dev]"
