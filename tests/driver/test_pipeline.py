"""Prune, continue and evaluate real checkpoints on disk (tiny random models, a local text file):
outputs reload with transformers and have exactly the requested pattern, inputs stay untouched,
bad input gets a clear error and leaves nothing half-written."""

import hashlib
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from copal.api import continue_checkpoint, evaluate_checkpoint, prune_checkpoint
from copal.checkpoint import CheckpointError
from copal.data import DataError
from copal.state import load_state

from .tiny import tiny_checkpoint

WINDOWS = dict(num_calibration=4, seq_len=32)


def _digest(directory):
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _linears(model):
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "copal"])
@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_prune_writes_loadable_checkpoint_with_exact_pattern(checkpoint, corpus, tmp_path, method,
                                                             pattern):
    before = _digest(checkpoint)
    out = prune_checkpoint(str(checkpoint), str(corpus), tmp_path / "out", method=method,
                           pattern=pattern, log=lambda *_: None, **WINDOWS)
    assert _digest(checkpoint) == before, "the input checkpoint is never modified"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard per block, one for the rest
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for name, weight in _linears(model).items():
        zero = weight == 0
        if pattern == "2:4":
            assert bool((zero.reshape(weight.shape[0], -1, 4).sum(-1) == 2).all()), name
        elif method == "magnitude":
            assert int(zero.sum()) == int(weight.numel() * 0.5), name  # per-layer threshold
        elif method == "sparsegpt":  # one threshold per block of 128 columns
            for block in zero.split(128, dim=1):
                assert int(block.sum()) == int(block.numel() * 0.5), name
        else:
            assert bool((zero.sum(1) == int(weight.shape[1] * 0.5)).all()), name
        kept = ~zero
        if method != "sparsegpt":  # SparseGPT updates the weights it keeps
            assert torch.equal(weight[kept], _linears(dense)[name][kept])
    if method == "copal":
        history, meta = load_state(out / "copal-state.safetensors")
        assert meta["datasets"] == [str(corpus)]
        assert all(len(layer.grads) == 1 and len(layer.acts) == 1 for layer in history.values())


def test_copal_continue_from_state_alone(checkpoint, corpus, corpus_b, tmp_path):
    first = prune_checkpoint(str(checkpoint), str(corpus), tmp_path / "step1", method="copal",
                             log=lambda *_: None, **WINDOWS)
    second = continue_checkpoint(str(first / "copal-state.safetensors"), str(corpus_b),
                                 tmp_path / "step2", log=lambda *_: None)
    history, meta = load_state(second / "copal-state.safetensors")
    assert meta["datasets"] == [str(corpus), str(corpus_b)]
    assert all(len(layer.grads) == 2 and len(layer.acts) == 2 for layer in history.values())
    ppl = evaluate_checkpoint(str(second), [str(corpus_b)], num_test=2, seq_len=32)
    dense = evaluate_checkpoint(str(checkpoint), [str(corpus_b)], num_test=2, seq_len=32)
    assert 0 < dense[str(corpus_b)] and 0 < ppl[str(corpus_b)] < float("inf")


def test_output_directory_holding_another_model_is_refused(checkpoint, corpus, tmp_path):
    taken = tmp_path / "taken"
    shutil.copytree(checkpoint, taken)
    before = _digest(taken)
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        prune_checkpoint(str(checkpoint), str(corpus), taken, log=lambda *_: None, **WINDOWS)
    assert _digest(taken) == before


def test_pattern_that_does_not_divide_the_layer(tmp_path, corpus):
    odd = tiny_checkpoint(tmp_path / "odd", hidden=40, intermediate=50)  # down_proj: in=50
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="does not divide layer"):
        prune_checkpoint(str(odd), str(corpus), out, pattern="4:8", log=lambda *_: None, **WINDOWS)
    assert not out.exists() and not list(tmp_path.glob(".out.*")), "nothing half-written"


def test_empty_and_missing_datasets(checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        prune_checkpoint(str(checkpoint), str(empty), tmp_path / "o", log=lambda *_: None, **WINDOWS)
    short = tmp_path / "short.txt"
    short.write_text("the king said unto the lord.")
    with pytest.raises(DataError, match="training tokens"):
        prune_checkpoint(str(checkpoint), str(short), tmp_path / "o", log=lambda *_: None, **WINDOWS)
    with pytest.raises(DataError, match="unknown source"):
        prune_checkpoint(str(checkpoint), str(tmp_path / "nope.txt"), tmp_path / "o",
                         log=lambda *_: None, **WINDOWS)
