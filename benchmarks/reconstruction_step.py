"""What a step of COPAL's OBS update costs against the project's SparseGPT on the same windows.

Three pruning sweeps of one model, each from its dense weights, with the same calibration
windows: SparseGPT (the baseline), COPAL-OBS step 1 (writes the second-order state), COPAL-OBS
step 2 (reads step 1's state block by block and writes its own). A step should cost about one
SparseGPT prune plus the state's disk traffic, which is reported (bytes read and written).

- CPU, real model: ``python -m benchmarks.reconstruction_step`` (SmolLM2-135M in fp32, 32 x 512
  kjv windows; about 15 minutes on the project's 2-core CPU).
- GPU, synthetic LLaMA shapes (SYNTHETIC WEIGHTS: speed only): ``python -m
  benchmarks.reconstruction_step --device cuda --shape llama-7b --blocks 4 --samples 128 --seq
  2048`` (scripts/gpu_checks.sh runs it).

Appends a record (machine, versions, date) to benchmarks/results/reconstruction_step.jsonl, or
to ``--out``/reconstruction_step.jsonl.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from copal.continual import hessian_state
from copal.methods import CopalOptions, Pattern, make_method
from copal.model import LayeredModel
from copal.sweep import prune_sweep
from copal.synthetic import SHAPES, SYNTHETIC_LABEL, synthetic_model
from copal_kernels.machine import environment

try:
    from .common import RESULTS_DIR
except ImportError:  # run as a script
    from common import RESULTS_DIR


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m", help="a checkpoint (CPU runs)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="synthetic shape instead of --model")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of the synthetic shape")
    parser.add_argument("--source", default="kjv")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--dtype", default=None, help="default: fp32 on a CPU, bf16 on a GPU")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    pattern = Pattern.parse(args.pattern)

    def open_model() -> LayeredModel:
        if args.shape:
            return synthetic_model(args.shape, num_blocks=args.blocks, dtype=dtype)
        from copal.assets import resolve_model

        return LayeredModel.from_checkpoint(resolve_model(args.model), dtype=dtype)

    if args.shape:
        print(SYNTHETIC_LABEL)
        windows = torch.randint(0, SHAPES[args.shape][5], (args.samples, args.seq),
                                generator=torch.Generator().manual_seed(0))
    else:
        from transformers import AutoTokenizer

        from copal.assets import resolve_model
        from copal.data import make_dataset

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
        windows = make_dataset(args.source, tokenizer, num_calibration=args.samples, num_test=0,
                               seq_len=args.seq).calibration
    options = CopalOptions(weight_update="obs")
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="copal-bench-") as scratch:
        first, second = Path(scratch) / "step1", Path(scratch) / "step2"
        runs = {
            "sparsegpt": lambda: make_method("sparsegpt"),
            "copal_obs_step1": lambda: make_method(
                "copal", history={}, grad_norms=None, options=options,
                hessians=hessian_state(options, None, first, 1)),
            "copal_obs_step2": lambda: make_method(
                "copal", history={}, grad_norms=None, options=options,
                hessians=hessian_state(options, first, second, 2)),
        }
        for name, method in runs.items():
            lm = open_model()
            _sync(device)
            started = time.perf_counter()
            prune_sweep(lm, windows, method(), pattern, device=device, desc=name)
            _sync(device)
            seconds[name] = time.perf_counter() - started
            print(f"{name}: {seconds[name]:.1f} s")
        state_bytes = _folder_bytes(second)
    record = {**environment(), "benchmark": "COPAL OBS step against SparseGPT",
              "model": f"synthetic {args.shape} x {args.blocks} blocks" if args.shape else args.model,
              "dtype": str(dtype).removeprefix("torch."), "pattern": args.pattern,
              "windows": f"{args.samples}x{args.seq}", "seconds": seconds,
              "step2_over_sparsegpt": seconds["copal_obs_step2"] / seconds["sparsegpt"],
              "state_bytes_read_and_written_per_step": [state_bytes, state_bytes]}
    print(f"step 2 / SparseGPT: {record['step2_over_sparsegpt']:.2f}; the state: "
          f"{state_bytes / 1e6:.1f} MB read and {state_bytes / 1e6:.1f} MB written per step")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "reconstruction_step.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
