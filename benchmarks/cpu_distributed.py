"""The standard protocol's Wanda-restart at 50% (PROTOCOL.md: SmolLM2-135M, wiki -> kjv ->
jargon, 32 calibration and 32 test windows of 512 tokens) in one process or over several ranks
(torch.distributed, gloo), timed:

    OMP_NUM_THREADS=2 python -m benchmarks.cpu_distributed
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m benchmarks.cpu_distributed

Each step prunes W0 with the step's windows (the sweep, each block's statistics reduced over the
ranks) and evaluates every dataset seen so far. Each launch appends one record to
benchmarks/results/cpu_distributed.jsonl: ranks, threads per rank, wall seconds per step and in
all, the seconds each rank spent in the statistics' collectives and the bytes they moved, the P
matrix, and a SHA-256 of every step's masks (which Linear weights are zero), so that launches are
compared bit for bit: ``python -m benchmarks.cpu_distributed --compare`` prints the last
launch of each rank count against each other.
"""

import argparse
import hashlib
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from copal import distributed
from copal.assets import resolve_model
from copal.continual import DenseWeights
from copal.data import make_dataset
from copal.evaluate import perplexities
from copal.methods import Pattern, make_method
from copal.model import LayeredModel
from copal.sweep import prune_sweep

try:
    from .common import RESULTS_DIR, append_results, print_table
except ImportError:  # run as a script
    from common import RESULTS_DIR, append_results, print_table

RESULTS = "cpu_distributed.jsonl"


def run(args) -> dict:
    distributed.setup("cpu")
    model_dir = distributed.from_writer(lambda: resolve_model("smollm2-135m"))
    lm = LayeredModel.from_model(AutoModelForCausalLM.from_pretrained(model_dir,
                                                                     dtype=torch.float32))
    dense = DenseWeights.snapshot(lm)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    datasets = [make_dataset(source, tokenizer, num_calibration=args.num_calibration,
                             num_test=args.num_test, seq_len=args.seq_len, seed=0)
                for source in ("wiki", "kjv", "jargon")]
    pattern = Pattern.parse(args.pattern)
    matrix, digests, step_seconds = [], [], []
    started = time.perf_counter()
    for dataset in datasets:
        begun = time.perf_counter()
        digest = hashlib.sha256()

        def masks(index, block):
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    digest.update((module.weight != 0).numpy().tobytes())

        prune_sweep(lm, dataset.calibration, make_method("wanda"), pattern, batch_size=1,
                    block_states=dense, on_block_done=masks, desc=f"prune {dataset.name}")
        ppl = perplexities(lm, {d.name: d.test for d in datasets}, batch_size=1)
        matrix.append([ppl[d.name] for d in datasets])
        digests.append(digest.hexdigest())
        step_seconds.append(time.perf_counter() - begun)
    seconds = time.perf_counter() - started
    per_rank = distributed.gather_rows(torch.tensor(
        [[distributed.traffic.seconds, float(distributed.traffic.bytes)]], dtype=torch.float64))
    return {"benchmark": "wanda-restart", "pattern": str(pattern),
            "windows": f"{args.num_calibration}x{args.seq_len}", "num_test": args.num_test,
            "ranks": distributed.world_size(), "threads_per_rank": torch.get_num_threads(),
            "seconds": seconds, "step_seconds": step_seconds,
            "collective_seconds": per_rank[:, 0].tolist(),
            "collective_mb": (per_rank[:, 1] / 2**20).tolist(), "P": matrix, "masks": digests}


def compare() -> None:
    latest = {}
    for line in (RESULTS_DIR / RESULTS).read_text().splitlines():
        record = json.loads(line)
        latest[(record["ranks"], record["threads_per_rank"])] = record
    rows = []
    reference = next(iter(latest.values()))
    for (ranks, threads), record in sorted(latest.items()):
        rows.append({"ranks x threads": f"{ranks} x {threads}", "seconds": f"{record['seconds']:.0f}",
                     "collectives s (max rank)": f"{max(record['collective_seconds']):.1f}",
                     "share": f"{max(record['collective_seconds']) / record['seconds']:.1%}",
                     "MB moved per rank": f"{max(record['collective_mb']):.0f}",
                     "masks = first": record["masks"] == reference["masks"],
                     "P = first": record["P"] == reference["P"],
                     "date": record["date"]})
    print_table(rows, list(rows[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="50%")
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--num-test", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--compare", action="store_true", help="print the recorded launches")
    args = parser.parse_args()
    if args.compare:
        return compare()
    record = run(args)
    if distributed.is_writer():
        print(json.dumps({k: v for k, v in record.items() if k not in ("P",)}, indent=1))
        print(f"appended to {append_results(RESULTS, [record])}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
