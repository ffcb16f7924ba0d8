"""The standard protocol (PROTOCOL.md) with Wanda-restart on a CPU, timed in one run two ways:

- ``copal``: the driver's path (block sweep with batched calibration forwards, the statistics
  and mask kernels, block-streamed perplexity of every seen dataset in one pass);
- ``loop``: a straightforward per-sample loop in the style of Wanda's published code, written
  here: the whole model in memory, block inputs captured one window at a time, every block run
  twice per window (batch 1) with hooks gathering ``scaler_row``, the metric materialised and
  masked with a stable ``torch.sort`` per row (a loop over groups for N:M), perplexity one test
  window at a time through the full model.

Beside them it measures a compute floor: the matmuls and attention that any path must run
(each block's statistics forward up to its last Linear, its propagation forward, and the
perplexity of every seen dataset after every step, through the blocks and the LM head), each
shape timed alone on this machine with one window of tokens, summed. ``--floor-only`` prints
just that.

Both paths must give the same masks bit for bit at every step (checked here; the loop's
statistic sums each window's squares the way Wanda's ``scaler_row`` does, in window order) and
the same perplexities. Prints the times, the ratio and the check; appends the record to
benchmarks/results/cpu_wanda_protocol.jsonl.

Run: ``python -m benchmarks.cpu_wanda_protocol [--pattern 50%] [--num-calibration 32 --seq-len 512]``
(the standard protocol takes about half an hour on 2 cores).
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from copal.assets import resolve_model
from copal.continual import DenseWeights
from copal.data import make_dataset
from copal.evaluate import perplexities
from copal.methods import Pattern, make_method
from copal.model import LayeredModel
from copal.sweep import prune_sweep
from copal_kernels import naive

try:
    from .common import append_results, median_seconds, print_table
except ImportError:  # run as a script
    from common import append_results, median_seconds, print_table


def _masks(blocks):
    return [{name: (module.weight != 0).clone() for name, module in block.named_modules()
             if isinstance(module, torch.nn.Linear)} for block in blocks]


def run_driver(model_dir, datasets, pattern, batch_size):
    """The driver's Wanda-restart: (masks per step, P matrix)."""
    lm = LayeredModel.from_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    dense = DenseWeights.snapshot(lm)
    masks, matrix = [], []
    for step, dataset in enumerate(datasets):
        prune_sweep(lm, dataset.calibration, make_method("wanda"), pattern, batch_size=batch_size,
                    block_states=dense, desc=f"copal step {step + 1}")
        masks.append(_masks(lm.blocks))
        ppl = perplexities(lm, {d.name: d.test for d in datasets[: step + 1]}, batch_size=batch_size,
                           desc=f"copal evaluate {step + 1}")
        matrix.append([ppl[d.name] for d in datasets[: step + 1]])
    return masks, matrix


def _loop_prune_layer(weight, scaler_row, pattern):
    """Wanda's per-layer step: the metric materialised, then per row a stable sort (Wanda's
    unstructured path) or per group of M columns a loop; Wanda's N:M loop uses ``topk``, whose
    order among exactly equal scores is unspecified, so this one sorts each group stably."""
    if pattern.kind != "nm":
        weight[naive.wanda_loop_mask(weight, scaler_row, pattern.sparsity, 0, 0)] = 0
        return
    metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    pruned = torch.zeros_like(metric, dtype=torch.bool)
    for start in range(0, metric.shape[1], pattern.m):
        lowest = torch.sort(metric[:, start:start + pattern.m], dim=1, stable=True)[1]
        pruned.scatter_(1, start + lowest[:, : pattern.m - pattern.n], True)
    weight[pruned] = 0


def loop_perplexity(model, windows) -> float:
    """Perplexity one window [S] at a time through the full model, as Wanda's eval does."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(ids[None]).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, ids[1:], reduction="sum").double())
            count += len(ids) - 1
    return math.exp(nll / count)


def run_loop(model_dir, datasets, pattern):
    """A per-sample loop in the style of Wanda's code: (masks per step, P matrix)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = LayeredModel.from_model(model)  # only to run a decoder layer with its rotary inputs
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    masks, matrix = [], []
    for step, dataset in enumerate(datasets):
        model.load_state_dict(dense)  # restart: prune W0
        with torch.no_grad():
            inps = [model.get_input_embeddings()(ids[None]) for ids in dataset.calibration]
            context = lm.block_context(inps[0])
            for block in lm.blocks:
                subset = lm.linears(block)
                sums = {name: torch.zeros(m.in_features) for name, m in subset.items()}

                def add_batch(name):
                    def hook(module, args, output):
                        sums[name].add_(naive.channel_sumsq(args[0][0]))
                    return hook

                handles = [m.register_forward_hook(add_batch(n)) for n, m in subset.items()]
                for j in range(len(inps)):
                    lm.run_block(block, inps[j], context)
                for handle in handles:
                    handle.remove()
                for name, module in subset.items():
                    _loop_prune_layer(module.weight.data, sums[name] / len(inps), pattern)
                inps = [lm.run_block(block, inps[j], context) for j in range(len(inps))]
        masks.append(_masks(lm.blocks))
        matrix.append([loop_perplexity(model, seen.test) for seen in datasets[: step + 1]])
    return masks, matrix


def _seconds(fn) -> float:
    return median_seconds(fn, repeats=5, warmup=2)


def compute_floor(config, num_sources: int, num_calibration: int, num_test: int,
                  seq_len: int) -> dict:
    """Seconds of the arithmetic Wanda-restart under the protocol cannot skip, from fp32
    matmuls and causal attention of the model's shapes timed alone (one window each)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * head_dim
    tokens = torch.randn(seq_len, hidden)

    def linear(in_features, out_features):
        x = tokens if in_features == hidden else torch.randn(seq_len, in_features)
        weight = torch.randn(out_features, in_features)
        return _seconds(lambda: F.linear(x, weight))

    attention_inputs = [torch.randn(1, heads, seq_len, head_dim) for _ in range(3)]
    attention = _seconds(lambda: F.scaled_dot_product_attention(*attention_inputs, is_causal=True))
    down = linear(inter, hidden)
    up_to_down = (linear(hidden, heads * head_dim) + linear(hidden, kv) * 2  # q; k, v
                  + linear(heads * head_dim, hidden)  # o
                  + linear(hidden, inter) * 2 + attention)  # gate, up
    block = up_to_down + down
    head = linear(hidden, config.vocab_size)
    blocks = config.num_hidden_layers
    sweep = num_sources * num_calibration * blocks * (up_to_down + block)
    evaluations = num_sources * (num_sources + 1) // 2  # every seen dataset after every step
    evaluate = evaluations * num_test * (blocks * block + head)
    return {"floor_seconds": sweep + evaluate, "sweep_floor_seconds": sweep,
            "evaluate_floor_seconds": evaluate,
            "block_forward_ms": block * 1e3, "lm_head_ms": head * 1e3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sources", nargs="+", default=["wiki", "kjv", "jargon"])
    parser.add_argument("--pattern", default="50%")
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--num-test", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=lambda t: t if t == "auto" else int(t), default="auto",
                        help="the driver's windows per forward chunk (auto: 1 on a CPU)")
    parser.add_argument("--floor-only", action="store_true",
                        help="measure and print the compute floor only (seconds)")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    floor = compute_floor(AutoConfig.from_pretrained(model_dir), len(args.sources),
                          args.num_calibration, args.num_test, args.seq_len)
    print(f"compute floor {floor['floor_seconds']:.0f} s (sweep {floor['sweep_floor_seconds']:.0f} s, "
          f"evaluation {floor['evaluate_floor_seconds']:.0f} s; one block forward "
          f"{floor['block_forward_ms']:.0f} ms, LM head {floor['lm_head_ms']:.0f} ms a window)")
    if args.floor_only:
        append_results("cpu_wanda_protocol.jsonl", [{
            "benchmark": "wanda-restart standard protocol: compute floor only",
            "windows": f"{args.num_calibration}x{args.seq_len} calibration, "
                       f"{args.num_test}x{args.seq_len} test", "sources": args.sources,
            "threads": torch.get_num_threads(), **floor}])
        return
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    datasets = [make_dataset(s, tokenizer, num_calibration=args.num_calibration,
                             num_test=args.num_test, seq_len=args.seq_len) for s in args.sources]
    pattern = Pattern.parse(args.pattern)

    start = time.perf_counter()
    fast_masks, fast_matrix = run_driver(model_dir, datasets, pattern, args.batch_size)
    fast_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loop_masks, loop_matrix = run_loop(model_dir, datasets, pattern)
    loop_seconds = time.perf_counter() - start

    differing = sum(int((a[name] != b[name]).sum()) for fa, fb in zip(fast_masks, loop_masks)
                    for a, b in zip(fa, fb) for name in a)
    total = sum(m.numel() for step in fast_masks for block in step for m in block.values())
    ppl_gap = max(abs(a - b) / b for ra, rb in zip(fast_matrix, loop_matrix) for a, b in zip(ra, rb))
    record = {"benchmark": "wanda-restart standard protocol", "pattern": str(pattern),
              "windows": f"{args.num_calibration}x{args.seq_len} calibration, "
                         f"{args.num_test}x{args.seq_len} test", "sources": args.sources,
              "copal_seconds": fast_seconds, "loop_seconds": loop_seconds,
              "speedup": loop_seconds / fast_seconds, "mask_entries_differing": differing,
              "mask_entries": total, "max_relative_ppl_gap": ppl_gap,
              "P_copal": fast_matrix, "P_loop": loop_matrix, "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, **floor,
              "copal_over_floor": fast_seconds / floor["floor_seconds"],
              "loop_over_floor": loop_seconds / floor["floor_seconds"]}
    path = append_results("cpu_wanda_protocol.jsonl", [record])
    print(f"results appended to {path}")
    print_table([{"path": "copal", "seconds": f"{fast_seconds:.0f}", "final P": fast_matrix[-1]},
                 {"path": "per-sample loop", "seconds": f"{loop_seconds:.0f}", "final P": loop_matrix[-1]}],
                ["path", "seconds", "final P"])
    print(f"speedup {loop_seconds / fast_seconds:.2f}x; masks differing: {differing} of {total}; "
          f"largest relative perplexity gap {ppl_gap:.2e}")
    print(f"against the compute floor ({floor['floor_seconds']:.0f} s): driver "
          f"{fast_seconds / floor['floor_seconds']:.2f}x, loop {loop_seconds / floor['floor_seconds']:.2f}x; "
          f"a 2x speedup needs the driver at {loop_seconds / 2 / floor['floor_seconds']:.2f}x")


if __name__ == "__main__":
    main()
