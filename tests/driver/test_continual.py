"""The continual runner, COPAL's state and its atomic writes, the metrics, on a tiny model and
synthetic windows."""

import math
from pathlib import Path

import pytest
import torch

from copal.api import ContinualPruner
from copal.atomic import write_atomically
from copal.continual import DenseWeights, RunSpec, run_continual
from copal.data import Dataset
from copal.evaluate import bwt, perplexities
from copal.methods import CopalOptions, LayerHistory, Pattern
from copal.model import LayeredModel
from copal.state import load_state, save_state
from copal.sweep import prune_sweep
from copal.methods import make_method

from .tiny import tiny_checkpoint, tiny_model


def _datasets(vocab, count=3):
    gen = torch.Generator().manual_seed(0)
    return [Dataset(f"d{i}", torch.randint(0, vocab, (4, 24), generator=gen),
                    torch.randint(0, vocab, (2, 24), generator=gen)) for i in range(count)]


def test_perplexity_matches_the_full_model():
    model = tiny_model()
    lm = LayeredModel.from_model(model)
    windows = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        loss = model(windows, labels=windows).loss
    ppl = perplexities(lm, {"x": windows}, batch_size=2)["x"]
    assert math.isclose(ppl, math.exp(float(loss)), rel_tol=1e-5)


def test_copal_options_are_checked():
    with pytest.raises(ValueError, match="aggregation"):
        RunSpec.from_dict(dict(method="copal", protocol="continual", aggregation="mean"))
    with pytest.raises(ValueError, match="normalisation"):
        CopalOptions(normalisation="l2")
    with pytest.raises(ValueError, match="group"):
        CopalOptions(group="column")


def test_bwt():
    matrix = [[10.0, 50.0, 70.0], [12.0, 20.0, 60.0], [13.0, 23.0, 30.0]]
    assert bwt(matrix) == {"bwt_mean": 3.0, "bwt_max": 3.0}
    assert bwt([[5.0]]) == {"bwt_mean": 0.0, "bwt_max": 0.0}


@pytest.mark.parametrize("spec", [
    RunSpec("copal", "continual", "50%"),
    RunSpec("copal", "continual", "50%", CopalOptions(gradient="lm", aggregation="sum",
                                                      normalisation="mean")),
    RunSpec("copal", "continual", "2:4", CopalOptions(aggregation="max", step_weights=[1, 1, 2])),
    RunSpec("copal", "continual", "50%", CopalOptions(group="layer")),
    RunSpec("wanda", "restart", "50%"), RunSpec("wanda", "joint", "2:4"),
    RunSpec("magnitude", "cascade", "50%"), RunSpec("sparsegpt", "cascade", "4:8"),
], ids=lambda s: s.label)
def test_run_continual(spec):
    model = tiny_model()
    lm = LayeredModel.from_model(model)
    dense = DenseWeights.snapshot(lm)
    result = run_continual(lm, dense, _datasets(model.config.vocab_size), spec, log=lambda *_: None)
    assert len(result["P"]) == 3 and all(len(row) == 3 for row in result["P"])
    assert all(v > 1 for row in result["P"] for v in row)
    if spec.method == "magnitude":  # cascade with an unchanging mask: stasis, BWT exactly 0
        assert result["bwt_mean"] == 0 and result["bwt_max"] == 0
    if spec.method == "copal":
        assert all(len(layer.grads) == 3 for layer in result["history"].values())
        means = torch.stack([torch.stack(layer.acts).mean(1) for layer in result["history"].values()])
        if spec.options.normalisation == "mean":
            assert torch.allclose(means, torch.ones_like(means), rtol=1e-5)
        else:  # raw norms are kept as measured
            assert not torch.allclose(means, torch.ones_like(means), rtol=1e-2)
    assert torch.equal(dense(0)["mlp.up_proj.weight"], DenseWeights.snapshot(
        LayeredModel.from_model(tiny_model()))(0)["mlp.up_proj.weight"]), "W0 is never touched"


@pytest.mark.parametrize("spec", [
    RunSpec("copal", "continual", "2:4", CopalOptions(gradient="lm")),
    RunSpec("sparsegpt", "cascade", "4:8"),
], ids=lambda s: s.label)
def test_run_continual_streamed_from_the_checkpoint_equals_in_memory(tmp_path, spec):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", layers=3)
    datasets = _datasets(96)
    lm = LayeredModel.from_model(tiny_model(layers=3))
    in_memory = run_continual(lm, DenseWeights.snapshot(lm), datasets, spec, log=lambda *_: None)
    lazy = LayeredModel.from_checkpoint(checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match="scratch_dir"):
        run_continual(lazy, None, datasets, spec, log=lambda *_: None)
    streamed = run_continual(lazy, None, datasets, spec, scratch_dir=tmp_path / "out",
                             log=lambda *_: None)
    assert streamed["P"] == in_memory["P"]
    assert all(p.is_meta for p in lazy.blocks.parameters()), "no block stays in memory"
    assert list((tmp_path / "out").iterdir()) == [], "the scratch blocks are removed"
    for key, layer in in_memory["history"].items():
        assert all(torch.equal(a, b) for a, b in zip(layer.acts, streamed["history"][key].acts))


@pytest.mark.triton
def test_copal_first_step_gives_wandas_mask_without_gradients():
    model = tiny_model(hidden=64, intermediate=96)
    windows = _datasets(model.config.vocab_size, 1)[0].calibration
    masks = {}
    for name, method in (("wanda", make_method("wanda")),
                         ("copal", make_method("copal", history={}, grad_norms=None,
                                               options=CopalOptions()))):
        lm = LayeredModel.from_model(tiny_model(hidden=64, intermediate=96))
        prune_sweep(lm, windows, method, Pattern.parse("50%"))
        masks[name] = [m.weight != 0 for m in lm.model.modules() if isinstance(m, torch.nn.Linear)
                       and m is not lm.head]
    differing = sum(int((a != b).sum()) for a, b in zip(masks["wanda"], masks["copal"]))
    total = sum(m.numel() for m in masks["wanda"])
    assert differing <= total * 1e-4  # only where Wanda's own scores tie within rounding


def test_state_round_trip(tmp_path):
    history = {"0.mlp.up_proj": LayerHistory([torch.rand(8), torch.rand(8)],
                                             [torch.rand(4), torch.rand(4)])}
    metadata = {"model": "/models/dense", "model_fingerprint": "f" * 32, "datasets": ["a", "b"],
                "pattern": "2:4",
                "gradient": "lm", "aggregation": "max", "normalisation": "mean", "group": "row",
                "step_weights": None, "weight_update": "none", "step_weighting": "tokens",
                "dampening": 0.01, "block_size": 128, "num_calibration": 32, "seq_len": 512,
                "seed": 0, "dtype": "float32", "batch_size": "auto", "hessian_id": None,
                "calibration_inputs": "pruned"}
    path = save_state(tmp_path / "state.safetensors", history, metadata)
    loaded, meta = load_state(path)
    assert meta == metadata
    for got, want in zip(loaded["0.mlp.up_proj"].grads + loaded["0.mlp.up_proj"].acts,
                         history["0.mlp.up_proj"].grads + history["0.mlp.up_proj"].acts):
        assert torch.equal(got, want)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable COPAL state file"):
        load_state(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="lacks seq_len"):
        save_state(tmp_path / "partial.safetensors", history,
                   {k: v for k, v in metadata.items() if k != "seq_len"})


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_atomically(tmp_path / "results.json", lambda name: Path(name).write_text("old"))

    def half_write_then_fail(name):
        Path(name).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_write_then_fail)
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_run_spec_validation():
    with pytest.raises(ValueError, match="own protocol"):
        RunSpec("copal", "restart")
    with pytest.raises(ValueError, match="unknown method"):
        RunSpec("obs", "restart")
    with pytest.raises(ValueError, match="pattern"):
        RunSpec("wanda", "restart", "5:4")


@pytest.mark.parametrize("method,protocol,pattern", [
    ("copal", "continual", "2:4"), ("wanda", "joint", "50%"), ("wanda", "cascade", "50%")],
    ids=["copal-2of4", "wanda-joint", "wanda-cascade"])
def test_continual_pruner_on_a_model_in_memory_equals_run_continual(tmp_path, method, protocol,
                                                                    pattern):
    datasets = _datasets(tiny_model().config.vocab_size, 2)
    spec = RunSpec(method, protocol, pattern)
    lm = LayeredModel.from_model(tiny_model())
    run = run_continual(lm, DenseWeights.snapshot(lm), datasets, spec, log=lambda *_: None)
    model = tiny_model()
    pruner = ContinualPruner(model, method=method, protocol=protocol, pattern=pattern)
    for dataset in datasets:
        pruner.step(dataset.calibration)
    for got, want in zip(model.model.layers.parameters(), lm.model.model.layers.parameters()):
        assert torch.equal(got, want)
    if method == "copal":
        path = pruner.save_state(tmp_path / "state.safetensors", datasets=["a", "b"])
        history, meta = load_state(path)
        assert meta["datasets"] == ["a", "b"] and meta["seq_len"] == datasets[0].calibration.shape[1]
        for key, layer in run["history"].items():
            assert all(torch.equal(a, b) for a, b in zip(layer.acts, history[key].acts))
    else:
        with pytest.raises(ValueError, match="only a COPAL pruner"):
            pruner.save_state(tmp_path / "state.safetensors", datasets=["a", "b"])
    with pytest.raises(ValueError, match="int64"):
        pruner.step(datasets[0].calibration.float())
