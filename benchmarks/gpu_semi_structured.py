"""Dense against 2:4 semi-structured sparse weights on a GPU (torch.sparse.to_sparse_semi_structured:
cuSPARSELt where torch has it, else CUTLASS), reported where 2:4 wins and where it loses.

    python -m benchmarks.gpu_semi_structured [--out DIR] [--layers-only]

- Layers: ``F.linear`` on the LLaMA-7B and LLaMA-65B weight shapes (random weights, 2:4 by
  magnitude: synthetic, for speed only) in bf16 and fp16, at prefill (4096 tokens) and decode
  (16 tokens: one step of a batch of 16) sizes; the sparse output is first checked against the
  dense-masked one.
- A whole model: the embedded SmolLM2-135M pruned at 2:4 by ``copal prune`` (magnitude: no data),
  loaded by :func:`copal.semi_structured.load_semi_structured`, its logits checked against the
  dense-masked model's; prefill tokens/s (8 x 512 tokens) and decode tokens/s (batch 16, 64
  steps with the KV cache), bf16.

Times are medians of ``triton.testing.do_bench`` (layers) or of 5 timed runs after 2 warm-ups
(model). Results, with GPU, versions and date, go to ``--out`` (default benchmarks/results/) as
JSON, and the tables are printed.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from copal.semi_structured import check_device, load_semi_structured

from .common import LLAMA_65B_SHAPES, LLAMA_7B_SHAPES, RESULTS_DIR, environment, print_table

TOKENS = {"prefill": 4096, "decode": 16}
COLUMNS = ["model", "shape", "dtype", "phase", "dense_ms", "sparse_ms", "speedup", "max_rel_err"]


def magnitude_2of4(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the 2 smallest |w| of every 4 consecutive inputs set to zero."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, drop, 0).reshape(weight.shape)


def bench_layers(rows):
    for model, shapes in (("llama-7b", LLAMA_7B_SHAPES), ("llama-65b", LLAMA_65B_SHAPES)):
        for out_features, in_features in shapes:
            for dtype in (torch.bfloat16, torch.float16):
                dense = magnitude_2of4(torch.randn(out_features, in_features, device="cuda",
                                                   dtype=dtype))
                sparse = torch.sparse.to_sparse_semi_structured(dense)
                for phase, tokens in TOKENS.items():
                    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
                    reference = F.linear(x, dense).float()
                    error = float((F.linear(x, sparse).float() - reference).norm()
                                  / reference.norm())
                    dense_ms = do_bench(lambda: F.linear(x, dense), return_mode="median")
                    sparse_ms = do_bench(lambda: F.linear(x, sparse), return_mode="median")
                    rows.append({"model": model, "shape": f"{out_features}x{in_features}",
                                 "dtype": str(dtype).removeprefix("torch."), "phase": phase,
                                 "dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4),
                                 "speedup": round(dense_ms / sparse_ms, 2),
                                 "max_rel_err": f"{error:.1e}"})
    torch.cuda.empty_cache()


def _median_seconds(fn, repeats=5, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_model(rows):
    from transformers import AutoModelForCausalLM

    from copal.api import prune_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        out = prune_checkpoint("smollm2-135m", None, Path(scratch) / "smollm2-2of4",
                               method="magnitude", pattern="2:4", device="cuda",
                               log=lambda *_: None)
        dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda().eval()
        report = {}
        sparse = load_semi_structured(out, dtype=torch.bfloat16, report=report)
    converted = sum(v == "semi-structured" for v in report.values())
    ids = torch.randint(0, dense.config.vocab_size, (8, 512), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        reference = dense(ids).logits.float()
        error = float((sparse(ids).logits.float() - reference).norm() / reference.norm())
        for phase in ("prefill", "decode"):
            results = {}
            for name, model in (("dense", dense), ("sparse", sparse)):
                if phase == "prefill":
                    seconds = _median_seconds(lambda: model(ids))
                    tokens = ids.numel()
                else:
                    prompt = ids[:, :32].repeat(2, 1)  # batch 16

                    def decode():
                        model.generate(prompt, max_new_tokens=64, min_new_tokens=64,
                                       do_sample=False, pad_token_id=0)
                    seconds = _median_seconds(decode, repeats=3, warmup=1)
                    tokens = prompt.shape[0] * 64
                results[name] = tokens / seconds
            rows.append({"model": f"smollm2-135m ({converted}/{len(report)} Linears 2:4)",
                         "shape": "whole model", "dtype": "bfloat16", "phase": phase,
                         "dense_ms": f"{results['dense']:.0f} tok/s",
                         "sparse_ms": f"{results['sparse']:.0f} tok/s",
                         "speedup": round(results["sparse"] / results["dense"], 2),
                         "max_rel_err": f"{error:.1e}"})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--layers-only", action="store_true")
    args = parser.parse_args()
    check_device("cuda", torch.bfloat16)
    rows = []
    try:
        bench_layers(rows)
        if not args.layers_only:
            bench_model(rows)
    finally:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "gpu_semi_structured.json"
        path.write_text(json.dumps({**environment(), "rows": rows}, indent=1))
        if rows:
            print_table(rows, COLUMNS)
        print(f"written {path}")


if __name__ == "__main__":
    main()
