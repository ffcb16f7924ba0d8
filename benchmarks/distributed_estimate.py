"""What a data-parallel step spends in communication (copal.distributed), from the sizes of the
statistics the code reduces and a stated interconnect:

    python -m benchmarks.distributed_estimate [--bandwidth-gbs 300] [--latency-us 30]

Each reduced statistic is a sum of partials, one per unit of calibration, broadcast by the rank
that owns the unit, every partial of a block's Linears in one message per unit:

- activation sums of squares (Wanda, COPAL mask-only): per window, ``sum(in_features)`` fp32
  over the block's Linears;
- Gram matrices (SparseGPT, COPAL's OBS update): per chunk of ``batch`` windows, ``in^2`` fp32
  per distinct Linear input (q/k/v share one, gate/up one);
- gradient norms (COPAL's gradient pass, once a step): per chunk, ``sum(out_features)`` fp32
  over every Linear of the model;
- perplexity: one fp64 per test window, once an evaluation; and per block a small check that
  the ranks' pruned weights agree.

A broadcast costs ``latency + bytes / bandwidth`` (every other rank receives the whole
message, pipelined); a unit's message is counted once whoever sends it, so the total does not
depend on the number of ranks (each rank's compute does: 1/R of the windows). The model is checked against the
bytes that ``benchmarks.cpu_distributed`` counted on SmolLM2 (``--check``), then applied to
LLaMA-65B shapes on 8 GPUs, printed beside the measured single-GPU step (docs/performance.md).
"""

import argparse
import json
import math

try:
    from .common import RESULTS_DIR, print_table
except ImportError:  # run as a script
    from common import RESULTS_DIR, print_table

SHAPES = {  # hidden, intermediate, attention width of k/v, blocks
    "smollm2-135m": (576, 1536, 192, 30),
    "llama-7b": (4096, 11008, 4096, 32),
    "llama-65b": (8192, 22016, 8192, 80),
}


def per_block_bytes(shape: str) -> dict:
    hidden, intermediate, kv, _ = SHAPES[shape]
    ins = [hidden] * 6 + [intermediate]  # q k v o gate up down
    outs = [hidden, kv, kv, hidden, intermediate, intermediate, hidden]
    return {"acts per window": 4 * sum(ins),
            "grams per chunk": 4 * (3 * hidden ** 2 + intermediate ** 2),
            "grads per chunk": 4 * sum(outs)}


def step_traffic(shape: str, method: str, windows: int, batch: int, test_windows: int,
                 evaluations: int = 1) -> dict:
    """Messages and bytes of one step (the sweep, COPAL's gradient pass if ``method`` is
    ``copal-grad``, and ``evaluations`` perplexity passes) for the whole group."""
    blocks = SHAPES[shape][3]
    sizes = per_block_bytes(shape)
    chunks = math.ceil(windows / batch)
    if method in ("wanda", "copal", "copal-grad"):
        messages, size = blocks * windows, blocks * windows * sizes["acts per window"]
    else:  # sparsegpt, copal-obs
        messages, size = blocks * chunks, blocks * chunks * sizes["grams per chunk"]
    if method == "copal-grad":
        messages += chunks
        size += chunks * blocks * sizes["grads per chunk"]
    messages += evaluations + blocks  # perplexity gather; per-block weight check
    size += evaluations * 8 * test_windows + blocks * 8 * 2 * 9
    return {"messages": messages, "bytes": size}


def seconds(traffic: dict, bandwidth_gbs: float, latency_us: float) -> float:
    return traffic["messages"] * latency_us * 1e-6 + traffic["bytes"] / (bandwidth_gbs * 1e9)


def check(path=RESULTS_DIR / "cpu_distributed.jsonl") -> None:
    """The model's bytes against those counted by benchmarks.cpu_distributed (a rank receives
    every unit's partials that it does not own; counted here as all units, the upper bound)."""
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["ranks"] < 2:
            continue
        windows, seq = map(int, record["windows"].split("x"))
        predicted = 3 * step_traffic("smollm2-135m", "wanda", windows, 1, 3 * record["num_test"])[
            "bytes"]
        print(f"{record['ranks']} ranks, {record['windows']}: counted {max(record['collective_mb']):.1f} MB "
              f"per rank, modelled {predicted / 2**20:.1f} MB for 3 steps")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth-gbs", type=float, default=300.0,
                        help="broadcast bus bandwidth, GB/s (default 300: NVLink, one node)")
    parser.add_argument("--latency-us", type=float, default=30.0)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        return check()
    rows = []
    for shape in ("llama-7b", "llama-65b"):
        for method in ("wanda", "copal", "copal-grad", "sparsegpt", "copal-obs"):
            traffic = step_traffic(shape, method, args.windows, args.batch, args.windows)
            rows.append({"shape": shape, "method": method, "messages": traffic["messages"],
                         "GB": f"{traffic['bytes'] / 1e9:.2f}",
                         "comm s": f"{seconds(traffic, args.bandwidth_gbs, args.latency_us):.2f}"})
    print(f"any number of ranks, {args.windows} windows of 2048 tokens, chunks of {args.batch}, "
          f"{args.bandwidth_gbs:g} GB/s, {args.latency_us:g} us a message")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
