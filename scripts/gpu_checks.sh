#!/usr/bin/env bash
# Every GPU check and benchmark, in one go, for a session lent the device (see the device tool):
#   bash scripts/gpu_checks.sh [kernels|sweep|all]
# Runs on the device machine's own image (torch, triton, transformers preinstalled) from the
# working tree; writes JSON and logs under $OUT (default benchmarks/results) and prints a short
# table last. Budget: kernels about 3 minutes, sweep under 8.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
what="${1:-all}"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

if [[ "$what" == kernels || "$what" == all ]]; then
    # kernel tests on CUDA (Triton compiled, not interpreted) and the driver's tiny-model tests
    timeout 240 python -m pytest -q -x tests/test_*.py tests/driver/test_model.py \
        tests/driver/test_synthetic.py -p no:cacheprovider 2>&1 | tail -n 15 | tee "$OUT/pytest.txt" || status=1
    timeout 300 python -m benchmarks.gpu_kernels --out "$OUT" 2>&1 | tee "$OUT/gpu_kernels.txt" || status=1
fi
if [[ "$what" == sweep || "$what" == all ]]; then
    timeout 480 python -m benchmarks.gpu_sweep --out "$OUT" 2>&1 | grep -v "block/s" | tee "$OUT/gpu_sweep.txt" || status=1
fi
exit $status
