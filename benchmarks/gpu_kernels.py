"""GPU benchmark of the fused kernels on LLaMA weight shapes (random bf16 weights of real shapes:
synthetic, for speed only), against their torch references, Wanda's original code path and the
copy bandwidth measured in the same run.

    python -m benchmarks.gpu_kernels [--shapes 7b,65b] [--out DIR]

Times are medians of ``triton.testing.do_bench``. GB/s counts the bytes an op must move: the
in-place prunes read and write W once (2 x 2 bytes a weight in bf16); channel_sumsq_ reads its
input once. Every fused result is first checked bit for bit against the torch reference. Each row
with a target of issue 16 says whether it is met. SparseGPT's block loop is timed per layer of the
LLaMA-7B shapes against the torch loop it replaces. Results, with GPU, versions and date, are
written as JSON to ``--out`` (default benchmarks/results/) and the tables are printed last.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from triton.testing import do_bench

import copal_kernels as ck
from copal_kernels import naive

from .common import (LLAMA_65B_SHAPES, LLAMA_7B_SHAPES, RESULTS_DIR, environment, median_seconds,
                     print_table)

DEVICE = "cuda"  # --device cpu: a smoke run of the code path (under TRITON_INTERPRET=1)

SHAPE_SETS = {"7b": LLAMA_7B_SHAPES, "65b": LLAMA_65B_SHAPES, "tiny": [(48, 256)]}


COLUMNS = ["shape", "op", "ms", "GB/s", "of_copy_bw", "speedup_vs_baseline", "target", "met"]


def median_ms(fn) -> float:
    if DEVICE == "cpu":  # the smoke run (tests/driver/test_synthetic.py): numbers mean nothing
        return median_seconds(fn, repeats=1, warmup=0) * 1e3
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def check_identical(weight, grads, acts):
    """Assert the fused kernels' masks equal the torch reference's on this input."""
    score = naive.importance(weight, grads, acts)
    checks = {
        "2:4": (ck.nm_mask(weight, grads, acts, n=2, m=4), naive.nm_mask(score, 2, 4)),
        "4:8": (ck.nm_mask(weight, grads, acts, n=4, m=8), naive.nm_mask(score, 4, 8)),
        "row 50%": (ck.unstructured_mask(weight, grads, acts, sparsity=0.5),
                    naive.row_mask(score, 0.5)),
    }
    magnitude = weight.abs().float()
    checks["layer 50%"] = (ck.unstructured_mask(weight, sparsity=0.5, group="layer"),
                           naive.layer_mask(magnitude, 0.5))
    for name, (fused, reference) in checks.items():
        if not torch.equal(fused, reference):
            raise AssertionError(f"{name}: fused mask differs from the reference "
                                 f"({int((fused != reference).sum())} weights)")
    del score, magnitude, checks


# issue 16's targets: (fraction of copy bandwidth, speed-up over the baseline), None = no target
NM_TARGET = (0.80, None)
ROW_TARGET = (0.40, 10.0)
LAYER_TARGET = (None, 3.0)
STATS_TARGET = (0.70, None)


def _row(shape, op, ms, moved, copy_gbps, baseline_ms=None, target=(None, None)):
    gbps = moved / ms / 1e6
    fraction = gbps / copy_gbps
    speedup = baseline_ms / ms if baseline_ms else None
    bandwidth_target, speedup_target = target
    goals = []
    if bandwidth_target is not None:
        goals.append(fraction >= bandwidth_target)
    if speedup_target is not None:
        goals.append(speedup >= speedup_target)
    wanted = " & ".join(([f">= {bandwidth_target:.0%} copy"] if bandwidth_target else [])
                        + ([f">= {speedup_target:g}x"] if speedup_target else []))
    return {"shape": shape, "op": op, "ms": round(ms, 4), "GB/s": round(gbps, 1),
            "of_copy_bw": round(fraction, 3),
            "speedup_vs_baseline": round(speedup, 1) if speedup else "-",
            "target": wanted or "-", "met": ("yes" if all(goals) else "NO") if goals else "-"}


def bench_shape(out_features, in_features):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weight = torch.randn(out_features, in_features, device=DEVICE, generator=gen,
                         dtype=torch.bfloat16)
    scaler_row = torch.rand(in_features, device=DEVICE, generator=gen) * 4
    act_norms = torch.sqrt(scaler_row)
    grads3 = torch.rand(3, out_features, device=DEVICE, generator=gen) + 0.1
    acts3 = torch.rand(3, in_features, device=DEVICE, generator=gen) + 0.1
    check_identical(weight, grads3, acts3)

    numel = weight.numel()
    read_write = 2 * numel * weight.element_size()
    copy_target = torch.empty_like(weight)
    copy_ms = median_ms(lambda: copy_target.copy_(weight))
    copy_gbps = read_write / copy_ms / 1e6
    shape = f"{out_features}x{in_features}"

    def ref_nm():
        keep = naive.nm_mask(naive.importance(weight, None, act_norms[None]), 2, 4)
        weight.masked_fill_(~keep, 0)

    # baselines: Wanda's own code paths and a flat torch.sort (the magnitude baseline)
    wanda_nm_ms = median_ms(lambda: weight.masked_fill_(
        naive.wanda_loop_mask(weight, scaler_row, 0, 2, 4), 0))
    wanda_row_ms = median_ms(lambda: weight.masked_fill_(
        naive.wanda_loop_mask(weight, scaler_row, 0.5, 0, 0), 0))
    flat_sort_ms = median_ms(lambda: weight.masked_fill_(
        ~naive.layer_mask(weight.abs().float(), 0.5), 0))
    rows = [_row(shape, "2:4 torch reference (Wanda T=1)", median_ms(ref_nm), read_write,
                 copy_gbps, wanda_nm_ms)]
    # every in-place prune with the default check_finite=True: the check folded into the pass
    for (n, m), steps, aggregation in [((2, 4), 1, "sum"), ((4, 8), 1, "sum"),
                                       ((2, 4), 3, "sum"), ((2, 4), 3, "max"),
                                       ((2, 4), 3, "sumsq"), ((4, 8), 3, "sumsq")]:
        grads, acts = (None, act_norms) if steps == 1 else (grads3, acts3)
        ms = median_ms(lambda: ck.nm_prune_(weight, grads, acts, n=n, m=m,
                                            aggregation=aggregation))
        rows.append(_row(shape, f"{n}:{m} nm_prune_ T={steps} {aggregation}", ms, read_write,
                         copy_gbps, wanda_nm_ms if (n, m, steps) == (2, 4, 1) else None,
                         NM_TARGET))
    ms = median_ms(lambda: ck.nm_prune_(weight, None, act_norms, n=2, m=4, check_finite=False))
    rows.append(_row(shape, "2:4 nm_prune_ T=1 sum, no check", ms, read_write, copy_gbps))
    ms = median_ms(lambda: ck.unstructured_prune_(weight, None, act_norms, sparsity=0.5))
    rows.append(_row(shape, "row50 unstructured_prune_ T=1 (Wanda)", ms, read_write, copy_gbps,
                     wanda_row_ms, ROW_TARGET))
    ms = median_ms(lambda: ck.unstructured_prune_(weight, grads3, acts3, sparsity=0.5,
                                                  aggregation="sumsq"))
    rows.append(_row(shape, "row50 unstructured_prune_ T=3 sumsq", ms, read_write, copy_gbps,
                     wanda_row_ms, ROW_TARGET))
    ms = median_ms(lambda: ck.unstructured_prune_(weight, sparsity=0.5, group="layer"))
    rows.append(_row(shape, "layer50 unstructured_prune_ (magnitude)", ms, read_write,
                     copy_gbps, flat_sort_ms, LAYER_TARGET))

    tokens = torch.randn(16384, in_features, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    acc = torch.zeros(in_features, device=DEVICE)
    stats_ms = median_ms(lambda: ck.channel_sumsq_(acc, tokens))
    stats_ref_ms = median_ms(lambda: acc.add_(naive.channel_sumsq(tokens)))
    rows.append(_row(f"16384x{in_features}", "channel_sumsq_ (bf16 activations)", stats_ms,
                     tokens.numel() * tokens.element_size(), copy_gbps, stats_ref_ms,
                     STATS_TARGET))
    return rows, copy_gbps


def _timed(fn, repeats=3):
    """Median of a few timed runs with CUDA events (for ops too slow for do_bench's 100 ms)."""
    if DEVICE == "cpu":
        return median_seconds(fn, repeats=1, warmup=0) * 1e3
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_sparsegpt(out_features, in_features, samples=4096):
    """SparseGPT's block loop on one layer (synthetic weights and inputs): the torch loop as
    SparseGPT and llm-compressor write it against :func:`copal_kernels.sparsegpt_prune_`, after
    checking that both prune the same weights."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    W = torch.randn(out_features, in_features, device=DEVICE, generator=gen)
    X = torch.randn(samples, in_features, device=DEVICE, generator=gen)
    H = 2 * X.T @ X / samples
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(in_features, device=DEVICE)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    del X, H
    rows = []
    for label, prune_n, prune_m, sparsity in (("2:4", 2, 4, 0.0), ("50%", 0, 0, 0.5)):
        theirs, ours = W.clone(), W.clone()
        naive.sparsegpt_loop_prune_(theirs, Hinv, sparsity, prune_n, prune_m, 128)
        ck.sparsegpt_prune_(ours, Hinv, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m)
        same = bool(torch.equal(theirs == 0, ours == 0))
        loop_ms = _timed(lambda: naive.sparsegpt_loop_prune_(W.clone(), Hinv, sparsity, prune_n,
                                                             prune_m, 128), repeats=2)
        fused_ms = _timed(lambda: ck.sparsegpt_prune_(W.clone(), Hinv, sparsity=sparsity,
                                                      prune_n=prune_n, prune_m=prune_m))
        rows.append({"shape": f"{out_features}x{in_features}", "op": f"SparseGPT {label} layer",
                     "torch_loop_ms": round(loop_ms, 2), "fused_ms": round(fused_ms, 2),
                     "speedup": round(loop_ms / fused_ms, 1), "same_mask": same})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="7b,65b", help="comma-separated: 7b, 65b, tiny")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of the code path, numbers meaningless")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS_DIR))
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_kernels needs a CUDA GPU (or --device cpu for a smoke run)")
    env = environment()
    print(f"# {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}",
          flush=True)
    rows, copy_bw, obs_rows = [], {}, []
    obs_shapes = [shape for key in ("7b", "tiny") if key in args.shapes for shape in SHAPE_SETS[key]]
    for out_features, in_features in obs_shapes:
        obs_rows.extend(bench_sparsegpt(out_features, in_features))
        print(f"  SparseGPT {out_features}x{in_features}: timed", flush=True)
    for key in args.shapes.split(","):
        for out_features, in_features in SHAPE_SETS[key]:
            shape_rows, copy_gbps = bench_shape(out_features, in_features)
            copy_bw[f"{out_features}x{in_features}"] = round(copy_gbps, 1)
            rows.extend(shape_rows)
            print(f"  {out_features}x{in_features}: copy {copy_gbps:.0f} GB/s, "
                  f"{len(shape_rows)} ops timed, masks identical to the reference", flush=True)
            print_table(shape_rows, COLUMNS)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_kernels-{env['date'][:10]}.json"
    path.write_text(json.dumps({"environment": env, "copy_GBps": copy_bw, "results": rows,
                                "sparsegpt": obs_rows}, indent=1))
    print(f"\nwritten {path}\n")
    print("speedup_vs_baseline: N:M vs Wanda's topk loop, row50 vs Wanda's torch.sort path, "
          "layer50 vs a flat torch.sort, channel_sumsq_ vs its torch reference; targets of "
          "issue 16; every prune with the default check_finite=True unless 'no check'")
    print_table(rows, COLUMNS)
    if obs_rows:
        print("\nSparseGPT's block loop per layer (LLaMA-7B shapes; a 7B model has 32 x (4 + 2 "
              "+ 1) such layers): the torch loop of SparseGPT / llm-compressor against the fused "
              "block")
        print_table(obs_rows, list(obs_rows[0]))


if __name__ == "__main__":
    main()
