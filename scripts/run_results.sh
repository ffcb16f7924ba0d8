#!/usr/bin/env bash
# The runs behind docs/results.md, one after the other; each is resumable (rerun to continue).
# Then: .venv/bin/python scripts/results_doc.py runs/standard runs/standard-2of4 ... (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
for config in results-50 results-2of4 results-4of8 ablations sweep-sparsity sweep-samples sweep-samples-128 \
        standard standard-2of4 standard-4of8 ablations-standard \
        reconstruction-standard reconstruction-fixes reconstruction-order; do
    .venv/bin/copal experiment --config "configs/$config.toml" --out "runs/$config"
done
