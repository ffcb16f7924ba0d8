"""Run by tests/driver/test_distributed.py, alone or under ``torchrun``: the API's verbs on a tiny
checkpoint, each rank computing its share (copal.distributed); rank 0 writes every output and
``perplexities.json``. ``fail``: rank 1 raises in the middle of a sweep (the other ranks must stop
too, not wait forever). ``experts``: Wanda and COPAL's OBS update only (a mixture-of-experts
model, whose experts' Linears get statistics from some chunks only), no in-memory pruner.

    python -m tests.driver.distributed_worker MODEL CORPUS CORPUS_B OUT [fail|experts]
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from copal import distributed
from copal.api import (ContinualPruner, continue_checkpoint, evaluate_checkpoint,
                       prune_checkpoint)
from copal.methods import CopalOptions, Wanda

RUNS = {  # output name: (method, pattern, COPAL options)
    "wanda": ("wanda", "50%", None),
    "sparsegpt": ("sparsegpt", "2:4", None),
    "copal-grad": ("copal", "4:8", CopalOptions(gradient="lm", aggregation="sum",
                                                normalisation="mean")),
    "copal-obs": ("copal", "50%", CopalOptions(weight_update="obs")),
}


def main(model, corpus, corpus_b, out, mode="run"):
    torch.set_num_threads(1)
    distributed.setup("cpu")
    out = Path(out)
    quiet = dict(log=lambda *_: None)
    if mode == "fail":
        original = Wanda.prune_block

        def failing(self, index, *args):
            if index == 1 and distributed.rank() == 1:
                raise RuntimeError("rank 1 fails on purpose")
            return original(self, index, *args)

        Wanda.prune_block = failing
    windows = dict(num_calibration=5, seq_len=32, seed=0, batch_size=1)
    runs = {name: RUNS[name] for name in ("wanda", "copal-obs")} if mode == "experts" else RUNS
    continued = [name for name in runs if name.startswith("copal")]
    for name, (method, pattern, options) in runs.items():
        prune_checkpoint(model, corpus, out / name, method=method, pattern=pattern,
                         options=options, **windows, **quiet)
    for name in continued:
        continue_checkpoint(out / name / "copal-state.safetensors", corpus_b, out / f"{name}-2",
                            **quiet)
    if mode != "experts":
        _in_memory(model, out)
    results = {name: evaluate_checkpoint(str(out / name), [corpus, corpus_b], num_test=5,
                                         seq_len=32, batch_size=1, tokenizer_from=model)
               for name in list(runs) + [f"{name}-2" for name in continued]}
    if distributed.is_writer():
        (out / "perplexities.json").write_text(json.dumps(results))
    distributed.shutdown()


def _in_memory(model, out):
    # the library's in-memory pruner: two COPAL-OBS steps, each rank its share of the windows
    in_memory = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    pruner = ContinualPruner(in_memory, method="copal", pattern="2:4", batch_size=1,
                             options=CopalOptions(weight_update="obs"))
    for seed in range(2):
        pruner.step(torch.randint(0, in_memory.config.vocab_size, (5, 32),
                                  generator=torch.Generator().manual_seed(seed)))
    if distributed.is_writer():
        (out / "pruner").mkdir()
    pruner.save_state(out / "pruner" / "state.safetensors", datasets=["a", "b"])
    if distributed.is_writer():
        save_file({k: v.clone() for k, v in in_memory.state_dict().items()},
                  out / "pruner" / "model.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:])
