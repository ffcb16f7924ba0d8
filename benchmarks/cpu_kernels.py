"""CPU benchmark of the kernel library's CPU path (the torch references the dispatch runs on a
machine without a GPU) against Wanda's original code path, on LLaMA-7B weight shapes (random
bf16 weights: the values do not matter for speed).

    .venv/bin/python -m benchmarks.cpu_kernels [--shapes 7b|small] [--repeats 3]

Prints one row per (shape, op): median seconds, GB/s of the bytes the op must move (read W,
write W), that as a fraction of the copy bandwidth measured in the same run, and the speed-up
over Wanda's loop. Appends the rows, with machine, versions and date, to
benchmarks/results/cpu_kernels.jsonl.
"""

import argparse

import torch

import copal_kernels as ck
from copal_kernels import naive

from .common import LLAMA_7B_SHAPES, append_results, environment, median_seconds, print_table

SMALL_SHAPES = [(1024, 1024), (2048, 1024)]


def bench_shape(out_features, in_features, repeats):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    scaler_row = torch.rand(in_features, generator=gen) * 4
    act_norms = torch.sqrt(scaler_row)
    moved = 2 * weight.numel() * weight.element_size()  # read W + write W
    copy_target = torch.empty_like(weight)
    copy_s = median_seconds(lambda: copy_target.copy_(weight), repeats)

    def prune_copy(fn):
        return lambda: fn(weight.clone())

    cases = {
        "2:4 wanda loop (topk per group)": prune_copy(
            lambda w: w.masked_fill_(naive.wanda_loop_mask(w, scaler_row, 0, 2, 4), 0)
        ),
        "2:4 nm_prune_": prune_copy(lambda w: ck.nm_prune_(w, None, act_norms, n=2, m=4)),
        "row 50% wanda loop (torch.sort)": prune_copy(
            lambda w: w.masked_fill_(naive.wanda_loop_mask(w, scaler_row, 0.5, 0, 0), 0)
        ),
        "row 50% unstructured_prune_": prune_copy(
            lambda w: ck.unstructured_prune_(w, None, act_norms, sparsity=0.5)
        ),
        "layer 50% magnitude unstructured_prune_": prune_copy(
            lambda w: ck.unstructured_prune_(w, sparsity=0.5, group="layer")
        ),
    }
    clone_s = median_seconds(lambda: weight.clone(), repeats)
    seconds = {name: max(median_seconds(fn, repeats) - clone_s, 1e-9) for name, fn in cases.items()}
    baseline = {"2:4": seconds["2:4 wanda loop (topk per group)"],
                "row": seconds["row 50% wanda loop (torch.sort)"]}
    rows = []
    for name, secs in seconds.items():
        gbps = moved / secs / 1e9
        base = baseline.get(name.split()[0])
        rows.append({
            "shape": f"{out_features}x{in_features}",
            "op": name,
            "ms": f"{secs * 1e3:.1f}",
            "GB/s": f"{gbps:.2f}",
            "of_copy_bw": f"{gbps / (moved / copy_s / 1e9):.1%}",
            "vs_wanda": f"{base / secs:.1f}x" if base else "-",
        })
    x = torch.randn(8 * 512, in_features, generator=gen).to(torch.bfloat16)
    acc = torch.zeros(in_features)
    stats_s = median_seconds(lambda: ck.channel_sumsq_(acc, x), repeats)
    stats_bytes = x.numel() * x.element_size()
    rows.append({
        "shape": f"{x.shape[0]}x{in_features}", "op": "channel_sumsq_ (activations)",
        "ms": f"{stats_s * 1e3:.1f}", "GB/s": f"{stats_bytes / stats_s / 1e9:.2f}",
        "of_copy_bw": f"{stats_bytes / stats_s / (moved / 2 / copy_s):.1%}", "vs_wanda": "-",
    })
    return rows, moved / copy_s / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["7b", "small"], default="7b")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = environment()
    print(f"# copal-kernels CPU path, {env['device']}, torch {env['torch']}, {env['date']}")
    print("# times exclude cloning W; GB/s counts reading and writing W once")
    shapes = LLAMA_7B_SHAPES if args.shapes == "7b" else SMALL_SHAPES
    all_rows = []
    for out_features, in_features in shapes:
        rows, copy_gbps = bench_shape(out_features, in_features, args.repeats)
        print(f"  {out_features}x{in_features}: measured copy bandwidth {copy_gbps:.2f} GB/s",
              flush=True)
        all_rows.extend(rows)
    print()
    print_table(all_rows, ["shape", "op", "ms", "GB/s", "of_copy_bw", "vs_wanda"])
    path = append_results("cpu_kernels.jsonl", all_rows)
    print(f"\nappended to {path}")


if __name__ == "__main__":
    main()
