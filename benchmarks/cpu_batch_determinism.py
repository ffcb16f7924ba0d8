"""How much the batch size of the calibration forwards changes the masks, on the real model.

One Wanda sweep of SmolLM2-135M (in ``--dtype``, PROTOCOL.md's calibration windows of one
source) per batch size; each sweep starts from the dense checkpoint. Prints, per block, how
many mask entries differ from the first batch size's, and appends the record to
benchmarks/results/cpu_batch_determinism.jsonl. docs/usage.md ("Reproducibility, exactly")
quotes it: the statistics are summed one window at a time, so block 0 never differs; the
activations propagated to later blocks are rounded differently by a batched forward.

Run: ``python -m benchmarks.cpu_batch_determinism [--pattern 2:4] [--batch-sizes 1 4]
[--source wiki] [--num-calibration 32 --seq-len 512] [--dtype float32]`` (fp32: under two
minutes per sweep on the project's 2-core CPU; bf16 runs several times slower there).
"""

import argparse
import time

import torch
from transformers import AutoTokenizer

from copal.assets import resolve_model
from copal.data import make_dataset
from copal.methods import Pattern, make_method
from copal.model import LayeredModel
from copal.sweep import prune_sweep

try:
    from .common import append_results
except ImportError:  # run as a script
    from common import append_results


def sweep_masks(model_dir, windows, pattern, batch_size, dtype):
    """Wanda's masks (True = kept) of every block, one list per block."""
    lm = LayeredModel.from_checkpoint(model_dir, dtype=dtype)
    masks = {}

    def keep(index, block):
        masks[index] = [(linear.weight != 0).clone() for linear in lm.linears(block).values()]

    prune_sweep(lm, windows, make_method("wanda"), pattern, batch_size=batch_size,
                on_block_done=keep, desc=f"wanda batch {batch_size}")
    return [masks[i] for i in range(lm.num_blocks)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    dataset = make_dataset(args.source, AutoTokenizer.from_pretrained(model_dir),
                           num_calibration=args.num_calibration, num_test=0, seq_len=args.seq_len)
    pattern = Pattern.parse(args.pattern)
    runs, seconds = {}, {}
    for batch in args.batch_sizes:
        started = time.perf_counter()
        runs[batch] = sweep_masks(model_dir, dataset.calibration, pattern, batch,
                                  getattr(torch, args.dtype))
        seconds[batch] = time.perf_counter() - started
    first = args.batch_sizes[0]
    records = []
    for batch in args.batch_sizes[1:]:
        per_block = [sum(int((a != b).sum()) for a, b in zip(x, y))
                     for x, y in zip(runs[first], runs[batch])]
        total = sum(m.numel() for block in runs[first] for m in block)
        first_differing = next((i for i, n in enumerate(per_block) if n), None)
        print(f"batch {first} vs {batch}: {sum(per_block):,} of {total:,} mask entries differ; "
              f"first differing block: {first_differing}; per block: {per_block}")
        records.append({"benchmark": "wanda masks against the calibration batch size",
                        "model": args.model, "dtype": args.dtype, "source": args.source,
                        "pattern": args.pattern,
                        "windows": f"{args.num_calibration}x{args.seq_len}",
                        "batch_sizes": [first, batch], "differing": sum(per_block),
                        "mask_entries": total, "first_differing_block": first_differing,
                        "per_block": per_block,
                        "sweep_seconds": [seconds[first], seconds[batch]]})
    path = append_results("cpu_batch_determinism.jsonl", records)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
