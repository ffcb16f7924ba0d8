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
from copal.cli import main
from copal.data import DataError
from copal.methods import CopalOptions
from copal.model import LayeredModel, UnsupportedModelError
from copal.outputs import OutputError
from copal.state import load_state

from .tiny import tiny_checkpoint, tiny_model, word_tokenizer

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


EVERY_METHOD = {"magnitude": dict(method="magnitude", pattern="50%"),
                "wanda": dict(method="wanda", pattern="2:4"),
                "sparsegpt": dict(method="sparsegpt", pattern="4:8"),
                "copal": dict(method="copal", pattern="2:4"),
                "copal-obs": dict(method="copal", pattern="50%",
                                  options=CopalOptions(weight_update="obs"))}


def check_pattern(weight, pattern, what):
    """``weight`` has EVERY_METHOD's ``pattern``: N:M exactly, or at least half zero."""
    zero = weight == 0
    if ":" in pattern:
        m = int(pattern.split(":")[1])
        assert bool((zero.reshape(weight.shape[0], -1, m).sum(-1) == m // 2).all()), what
    else:
        assert int(zero.sum()) >= weight.numel() // 2 - 1, what


def every_method(source, tmp_path, corpus, corpus_b):
    """(name, run, output) of each of EVERY_METHOD on checkpoint ``source``, COPAL's outputs
    those of the step continued from its state with ``corpus_b``."""
    for name, run in EVERY_METHOD.items():
        data = dict(data=None) if run["method"] == "magnitude" else dict(data=str(corpus),
                                                                            **WINDOWS)
        out = prune_checkpoint(str(source), out_dir=tmp_path / name, log=lambda *_: None,
                               **run, **data)
        if run["method"] == "copal":
            out = continue_checkpoint(str(out / "copal-state.safetensors"), str(corpus_b),
                                      tmp_path / f"{name}-2", log=lambda *_: None)
        yield name, run, out


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "olmo2", "granite", "gemma2", "gemma3",
                                  "mistral+sliding", "qwen2+sliding"])
def test_every_method_on_every_architecture(tmp_path, corpus, corpus_b, arch):
    """Magnitude, Wanda, SparseGPT, COPAL (mask-only, continued from its state) and COPAL's OBS
    update on each architecture and attention pattern: loadable checkpoints with the exact
    pattern in every Linear of every block (Phi-3's fused qkv_proj and gate_up_proj included)."""
    arch, _, sliding = arch.partition("+")
    model = tiny_model(arch, sliding=bool(sliding), tied=False)
    source = tmp_path / "model"
    model.save_pretrained(source)
    word_tokenizer(model.config.vocab_size).save_pretrained(source)
    for name, run, out in every_method(source, tmp_path, corpus, corpus_b):
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        linears = _linears(pruned)
        assert len(linears) == 2 * (4 if arch == "phi3" else 7)
        for layer, weight in linears.items():
            check_pattern(weight, run["pattern"], (name, layer))


@pytest.mark.parametrize("arch,pattern", [("mistral", "4:8"), ("qwen2", "4:8"), ("qwen2", "50%")])
def test_other_architectures_write_loadable_checkpoints(tmp_path, corpus, arch, pattern):
    source = tiny_checkpoint(tmp_path / arch, arch)
    before = _digest(source)
    out = prune_checkpoint(str(source), str(corpus), tmp_path / "out", method="copal",
                           pattern=pattern, log=lambda *_: None, **WINDOWS)
    assert _digest(source) == before
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__.lower().startswith(arch)
    for name, weight in _linears(model).items():
        zero = weight == 0
        if pattern == "4:8":
            assert bool((zero.reshape(weight.shape[0], -1, 8).sum(-1) == 4).all()), name
        else:
            assert bool((zero.sum(1) == weight.shape[1] // 2).all()), name
    if arch == "qwen2":  # q/k/v biases are written, and never pruned
        dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        assert torch.equal(model.model.layers[0].self_attn.q_proj.bias,
                           dense.model.layers[0].self_attn.q_proj.bias)


@pytest.mark.triton
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "copal"])
@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_prune_writes_loadable_checkpoint_with_exact_pattern(checkpoint, corpus, tmp_path, method,
                                                             pattern):
    before = _digest(checkpoint)
    data = dict(data=None) if method == "magnitude" else dict(data=str(corpus), **WINDOWS)
    out = prune_checkpoint(str(checkpoint), out_dir=tmp_path / "out", method=method,
                           pattern=pattern, log=lambda *_: None, **data)
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
                             options=CopalOptions(gradient="lm"), log=lambda *_: None, **WINDOWS)
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
    with pytest.raises(OutputError, match="already exists and is not empty"):
        prune_checkpoint(str(checkpoint), str(corpus), taken, log=lambda *_: None, **WINDOWS)
    assert _digest(taken) == before


def test_pattern_that_does_not_divide_the_layer(tmp_path, corpus):
    odd = tiny_checkpoint(tmp_path / "odd", hidden=40, intermediate=50)  # down_proj: in=50
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="does not divide layer"):
        prune_checkpoint(str(odd), str(corpus), out, pattern="4:8", log=lambda *_: None, **WINDOWS)
    assert _nothing_written(out)


def _nothing_written(out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_empty_and_missing_datasets(checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        prune_checkpoint(str(checkpoint), str(empty), tmp_path / "o", log=lambda *_: None, **WINDOWS)
    assert _nothing_written(tmp_path / "o")
    short = tmp_path / "short.txt"
    short.write_text("the king said unto the lord.")
    with pytest.raises(DataError, match="training tokens"):
        prune_checkpoint(str(checkpoint), str(short), tmp_path / "o", log=lambda *_: None, **WINDOWS)
    with pytest.raises(DataError, match="unknown source"):
        prune_checkpoint(str(checkpoint), str(tmp_path / "nope.txt"), tmp_path / "o",
                         log=lambda *_: None, **WINDOWS)


def test_output_that_is_or_holds_the_input_is_refused(checkpoint, corpus, tmp_path):
    before = _digest(checkpoint)
    for out in (checkpoint, checkpoint / "pruned", checkpoint.parent):
        with pytest.raises(OutputError, match="would overwrite or sit inside the input"):
            prune_checkpoint(str(checkpoint), str(corpus), out, overwrite=True,
                             log=lambda *_: None, **WINDOWS)
    assert _digest(checkpoint) == before


def test_unsupported_architecture_leaves_nothing(tmp_path, corpus):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        prune_checkpoint(str(gpt2), str(corpus), tmp_path / "out", log=lambda *_: None, **WINDOWS)
    assert _nothing_written(tmp_path / "out")


def test_failure_mid_sweep_leaves_nothing(checkpoint, corpus, tmp_path, monkeypatch):
    """A shard that turns out unreadable at block 1, after block 0's shard was written."""
    load_block = LayeredModel.load_block

    def failing(self, index, *args, **kwargs):
        if index == 1:
            raise CheckpointError("unreadable shard model-00002 (simulated)")
        return load_block(self, index, *args, **kwargs)

    monkeypatch.setattr(LayeredModel, "load_block", failing)
    with pytest.raises(CheckpointError, match="simulated"):
        prune_checkpoint(str(checkpoint), str(corpus), tmp_path / "out", log=lambda *_: None,
                         **WINDOWS)
    assert _nothing_written(tmp_path / "out")


def test_corrupt_or_foreign_state_is_refused(checkpoint, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 4)
    assert main(["continue", "--state", str(garbage), "--data", "wiki",
                 "--out", str(tmp_path / "out")]) == 2
    assert "not a readable COPAL state file" in capsys.readouterr().err
    shard = sorted(checkpoint.glob("model-*.safetensors"))[0]
    with pytest.raises(ValueError, match="not a COPAL state file"):
        load_state(shard)
    assert _nothing_written(tmp_path / "out")


def test_the_provenance_file_reruns_into_the_same_checkpoint(checkpoint, corpus, corpus_b,
                                                             tmp_path):
    """copal-checkpoint.json's ``rerun`` (a copal command line) makes the same checkpoint and
    state again, for prune with non-default COPAL options and for continue."""
    from safetensors.torch import load_file

    def tensors(directory):
        return {path.name: load_file(str(path)) for path in sorted(directory.glob("*.safetensors"))}

    def rerun(out, again):
        command = json.loads((out / "copal-checkpoint.json").read_text())["rerun"]
        assert command[:2] == ["copal", command[1]] and "--out" in command
        command[command.index("--out") + 1] = str(again)
        assert main(command[1:]) == 0
        first, second = tensors(out), tensors(again)
        assert first.keys() == second.keys() and len(first) > 2
        for name in first:
            assert first[name].keys() == second[name].keys()
            for key in first[name]:
                assert torch.equal(first[name][key], second[name][key]), (name, key)

    out = prune_checkpoint(str(checkpoint), str(corpus), tmp_path / "a", method="copal",
                           pattern="2:4", options=CopalOptions(weight_update="obs",
                                                               step_weights="linear",
                                                               dampening=0.05),
                           batch_size=2, log=lambda *_: None, **WINDOWS)
    command = json.loads((out / "copal-checkpoint.json").read_text())["rerun"]
    for flag, value in (("--weight-update", "obs"), ("--step-weights", "linear"),
                        ("--dampening", "0.05"), ("--batch-size", "2"), ("--pattern", "2:4")):
        assert command[command.index(flag) + 1] == value, command
    rerun(out, tmp_path / "a-again")
    continued = continue_checkpoint(str(out / "copal-state.safetensors"), str(corpus_b),
                                    tmp_path / "b", log=lambda *_: None)
    rerun(continued, tmp_path / "b-again")
