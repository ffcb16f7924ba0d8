#!/usr/bin/env bash
# Every GPU check and benchmark, in one call of the device tool (at most 10 minutes):
#   bash scripts/gpu_checks.sh [all|driver|sweep|kernels|reconstruction|sparse]
# Runs on the device machine's own image (python3 with torch, triton, transformers preinstalled)
# from the working tree; writes logs and JSON under $OUT (default benchmarks/results) and prints
# short tables. Order and time limits (all: about 9 minutes at most), most important first:
#   driver   the driver's CUDA paths against the CPU (tests/driver/test_gpu.py) and    70 s
#            the 2:4 loader against the dense-masked model (test_semi_structured.py)
#   sweep    benchmarks.gpu_sweep, the full COPAL step on 7B/65B/70B shapes, device    120 s
#            memory capped at 40 GB (the 65B target)
#            (rewrites its JSON after every record, so a cut run keeps what it did)
#   kernels  benchmarks.gpu_kernels (issue 16's targets, each row met or not, and      140 s
#            SparseGPT's block loop against the fused one on 7B shapes), then every    110 s
#            kernel test compiled for the GPU: the CPU tests' shapes and dtypes, both
#            per-row paths (pytest-xdist, on the image: Triton compiles in 8 processes)
#   reconstruction  benchmarks.reconstruction_step: a COPAL OBS step against SparseGPT   40 s
#            on 4 synthetic LLaMA-7B blocks, 128 x 2048 tokens
#   sparse   benchmarks.gpu_semi_structured: dense against 2:4 semi-structured weights,  60 s
#            7B/65B layer shapes and the whole SmolLM2 (prefill and decode tokens/s)
# SWEEP_ARGS passes arguments to the sweep benchmark (e.g. "--shape llama-65b --pattern 2:4").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
what="${1:-all}"
status=0
# progress bars rewrite one line with \r: keep the lines, drop the bars
clean() { tr '\r' '\n' | grep -v -e "block/s" -e "^\s*$"; }
wants() { [[ "$what" == all || "$what" == "$1" ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

if wants driver; then
    timeout "${DRIVER_TIMEOUT:-70}" python3 -m pytest -q tests/driver/test_gpu.py \
        tests/driver/test_semi_structured.py -p no:cacheprovider \
        2>&1 | clean | tee "$OUT/pytest_driver.txt" | tail -n 30 || status=1
fi
if wants sweep; then
    timeout "${SWEEP_TIMEOUT:-120}" python3 -m benchmarks.gpu_sweep --out "$OUT" ${SWEEP_ARGS:---device-memory-cap-gb 40} \
        2>&1 | clean | tee "$OUT/gpu_sweep.txt" || status=1
fi
if wants kernels; then
    timeout "${KERNELS_TIMEOUT:-140}" python3 -m benchmarks.gpu_kernels --out "$OUT" \
        2>&1 | clean | tee "$OUT/gpu_kernels.txt" || status=1
    timeout "${TESTS_TIMEOUT:-110}" python3 -m pytest -q -n 8 tests/test_*.py -p no:cacheprovider \
        2>&1 | clean | tee "$OUT/pytest_kernels.txt" | tail -n 30 || status=1
fi
if wants reconstruction; then
    timeout "${RECONSTRUCTION_TIMEOUT:-40}" python3 -m benchmarks.reconstruction_step --device cuda \
        --shape llama-7b --blocks 4 --samples 128 --seq 2048 --out "$OUT" \
        2>&1 | clean | tee "$OUT/reconstruction_step.txt" || status=1
fi
if wants sparse; then
    timeout "${SPARSE_TIMEOUT:-60}" python3 -m benchmarks.gpu_semi_structured --out "$OUT" \
        2>&1 | clean | tee "$OUT/gpu_semi_structured.txt" || status=1
fi
exit $status
