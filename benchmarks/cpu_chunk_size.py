"""How many windows per forward chunk suit a CPU: the driver's Wanda sweep and perplexity with
chunks of 1 and 8 windows, and a per-sample perplexity loop through the full model, on one
dataset of the real model. Appends to benchmarks/results/cpu_chunk_size.jsonl.

    .venv/bin/python -m benchmarks.cpu_chunk_size [--source wiki --windows 8 --seq-len 512]
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from copal.assets import resolve_model
from copal.data import make_dataset
from copal.evaluate import perplexities
from copal.methods import Pattern, make_method
from copal.model import LayeredModel
from copal.sweep import prune_sweep

try:
    from .common import append_results, print_table
    from .cpu_wanda_protocol import loop_perplexity
except ImportError:  # run as a script
    from common import append_results, print_table
    from cpu_wanda_protocol import loop_perplexity


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    model_dir = resolve_model("smollm2-135m")
    data = make_dataset(args.source, AutoTokenizer.from_pretrained(model_dir),
                        num_calibration=args.windows, num_test=args.windows, seq_len=args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = LayeredModel.from_model(model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for chunk in (1, 8):
        model.load_state_dict(dense)
        rows.append({
            "path": f"driver, {chunk} window(s) per chunk",
            "sweep_s": _seconds(lambda: prune_sweep(lm, data.calibration, make_method("wanda"),
                                                    Pattern.parse("50%"), batch_size=chunk)),
            "perplexity_s": _seconds(lambda: perplexities(lm, {"x": data.test}, batch_size=chunk))})
    rows.append({"path": "per-sample loop", "sweep_s": None,
                 "perplexity_s": _seconds(lambda: loop_perplexity(model, data.test))})
    path = append_results("cpu_chunk_size.jsonl", [{**row, "windows": args.windows,
                                                     "seq_len": args.seq_len, "source": args.source}
                                                    for row in rows])
    print(f"results appended to {path}")
    print_table([{k: (f"{v:.1f}" if isinstance(v, float) else ("-" if v is None else v))
                  for k, v in row.items()} for row in rows], ["path", "sweep_s", "perplexity_s"])


if __name__ == "__main__":
    main()
