"""GPU benchmark of the fused kernels on LLaMA weight shapes (random bf16 weights of real shapes:
synthetic, for speed only), against their torch references, Wanda's original code path and the
copy bandwidth measured in the same run.

    python -m benchmarks.gpu_kernels [--shapes 7b,65b] [--out DIR]

Times are medians of ``triton.testing.do_bench``. GB/s counts the bytes an op must move: the
in-place prunes read and write W once (2 x 2 bytes a weight in bf16); the mask-only variant reads
W and writes a 1-byte mask; channel_sumsq_ reads its input once. Every fused result is first
checked bit for bit against the torch reference. Results, with GPU, versions and date, are written
as JSON to ``--out`` (default benchmarks/results/) and a short table is printed last.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from triton.testing import do_bench

import copal_kernels as ck
from copal_kernels import naive

from .common import (LLAMA_65B_SHAPES, LLAMA_7B_SHAPES, RESULTS_DIR, environment, print_table)

SHAPE_SETS = {"7b": LLAMA_7B_SHAPES, "65b": LLAMA_65B_SHAPES}


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def check_identical(weight, grads, acts):
    """Assert the fused kernels' masks equal the torch reference's on this input."""
    score = naive.importance(weight, grads, acts)
    checks = {
        "2:4": (ck.nm_mask(weight, grads, acts, n=2, m=4), naive.nm_mask(score, 2, 4)),
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


def bench_shape(out_features, in_features):
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(out_features, in_features, device="cuda", generator=gen,
                         dtype=torch.bfloat16)
    scaler_row = torch.rand(in_features, device="cuda", generator=gen) * 4
    act_norms = torch.sqrt(scaler_row)
    grads3 = torch.rand(3, out_features, device="cuda", generator=gen) + 0.1
    acts3 = torch.rand(3, in_features, device="cuda", generator=gen) + 0.1
    check_identical(weight, grads3, acts3)

    numel = weight.numel()
    read_write = 2 * numel * weight.element_size()
    copy_target = torch.empty_like(weight)
    copy_ms = median_ms(lambda: copy_target.copy_(weight))
    copy_gbps = read_write / copy_ms / 1e6

    def ref_nm():
        keep = naive.nm_mask(naive.importance(weight, None, act_norms[None]), 2, 4)
        weight.masked_fill_(~keep, 0)

    def ref_row():
        keep = naive.row_mask(naive.importance(weight, None, act_norms[None]), 0.5)
        weight.masked_fill_(~keep, 0)

    def ref_layer():
        weight.masked_fill_(~naive.layer_mask(weight.abs().float(), 0.5), 0)

    # (name, fn, bytes moved, baseline for the speed-up)
    cases = [
        ("2:4 prune_ Wanda (T=1)", lambda: ck.nm_prune_(weight, None, act_norms, n=2, m=4,
                                                        check_finite=False), read_write),
        ("2:4 prune_ Wanda, finite check", lambda: ck.nm_prune_(weight, None, act_norms, n=2,
                                                                m=4), read_write),
        ("2:4 prune_ COPAL (T=3)", lambda: ck.nm_prune_(weight, grads3, acts3, n=2, m=4,
                                                        check_finite=False), read_write),
        ("2:4 mask only (T=1)", lambda: ck.nm_mask(weight, None, act_norms, n=2, m=4,
                                                   check_finite=False),
         numel * (weight.element_size() + 1)),
        ("2:4 torch reference", ref_nm, read_write),
        ("2:4 Wanda loop (topk/group)",
         lambda: weight.masked_fill_(naive.wanda_loop_mask(weight, scaler_row, 0, 2, 4), 0),
         read_write),
        ("row50 prune_ Wanda (T=1)", lambda: ck.unstructured_prune_(
            weight, None, act_norms, sparsity=0.5, check_finite=False), read_write),
        ("row50 prune_ COPAL (T=3)", lambda: ck.unstructured_prune_(
            weight, grads3, acts3, sparsity=0.5, check_finite=False), read_write),
        ("row50 torch reference", ref_row, read_write),
        ("row50 Wanda torch.sort path",
         lambda: weight.masked_fill_(naive.wanda_loop_mask(weight, scaler_row, 0.5, 0, 0), 0),
         read_write),
        ("layer50 magnitude prune_", lambda: ck.unstructured_prune_(
            weight, sparsity=0.5, group="layer", check_finite=False), read_write),
        ("layer50 torch reference (sort)", ref_layer, read_write),
    ]
    baselines = {"2:4": "2:4 Wanda loop (topk/group)", "row50": "row50 Wanda torch.sort path",
                 "layer50": "layer50 torch reference (sort)"}
    timings = {name: median_ms(fn) for name, fn, _ in cases}

    rows = []
    shape = f"{out_features}x{in_features}"
    for name, _, moved in cases:
        ms = timings[name]
        gbps = moved / ms / 1e6
        rows.append({
            "shape": shape, "op": name, "ms": round(ms, 4), "GB/s": round(gbps, 1),
            "of_copy_bw": round(gbps / copy_gbps, 3),
            "speedup_vs_baseline": round(timings[baselines[name.split()[0]]] / ms, 1),
        })

    tokens = torch.randn(16384, in_features, device="cuda", generator=gen, dtype=torch.bfloat16)
    acc = torch.zeros(in_features, device="cuda")
    stats_ms = median_ms(lambda: ck.channel_sumsq_(acc, tokens))
    stats_ref_ms = median_ms(lambda: acc.add_(naive.channel_sumsq(tokens)))
    stats_gbps = tokens.numel() * tokens.element_size() / stats_ms / 1e6
    rows.append({
        "shape": f"16384x{in_features}", "op": "channel_sumsq_ (bf16 activations)",
        "ms": round(stats_ms, 4), "GB/s": round(stats_gbps, 1),
        "of_copy_bw": round(stats_gbps / copy_gbps, 3),
        "speedup_vs_baseline": round(stats_ref_ms / stats_ms, 1),
    })
    return rows, copy_gbps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="7b,65b", help="comma-separated: 7b, 65b")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS_DIR))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_kernels needs a CUDA GPU")
    env = environment()
    print(f"# {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}",
          flush=True)
    rows, copy_bw = [], {}
    for key in args.shapes.split(","):
        for out_features, in_features in SHAPE_SETS[key]:
            shape_rows, copy_gbps = bench_shape(out_features, in_features)
            copy_bw[f"{out_features}x{in_features}"] = round(copy_gbps, 1)
            rows.extend(shape_rows)
            print(f"  {out_features}x{in_features}: copy {copy_gbps:.0f} GB/s, "
                  f"{len(shape_rows)} ops timed, masks identical to the reference", flush=True)
            torch.cuda.empty_cache()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_kernels-{env['date'][:10]}.json"
    path.write_text(json.dumps({"environment": env, "copy_GBps": copy_bw, "results": rows},
                               indent=1))
    print(f"\nwritten {path}\n")
    print("speedup_vs_baseline: 2:4 vs Wanda's topk loop, row50 vs Wanda's torch.sort path, "
          "layer50 vs a flat torch.sort, channel_sumsq_ vs its torch reference")
    print_table(rows, ["shape", "op", "ms", "GB/s", "of_copy_bw", "speedup_vs_baseline"])


if __name__ == "__main__":
    main()
