#!/usr/bin/env bash
# The runs behind docs/results.md, one after the other; each is resumable (rerun to continue).
set -euo pipefail
cd "$(dirname "$0")/.."
for config in results-50 results-2of4 results-4of8; do
    .venv/bin/copal experiment --config "configs/$config.toml" --out "runs/$config"
done
