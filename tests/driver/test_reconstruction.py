"""COPAL's OBS update from an accumulated second-order state (issue 15): equal to SparseGPT on one
dataset, to SparseGPT-joint at the layer level on several, continued from its state alone in
another verb exactly as in one process, and refusing a state it cannot serve."""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from copal.api import ContinualPruner, continue_checkpoint, prune_checkpoint
from copal.cli import main
from copal.hessian import HessianState, HessianStateError, block_file, hessian_dir
from copal.methods import CopalOptions, Pattern, make_method, obs_prune
from copal.model import LayeredModel
from copal.state import load_state
from copal.sweep import prune_sweep

from .tiny import tiny_model

OBS = CopalOptions(weight_update="obs")
WINDOWS = dict(num_calibration=4, seq_len=32)


def _windows(seed, count=4, length=24):
    return torch.randint(0, 96, (count, length), generator=torch.Generator().manual_seed(seed))


def _weights(model):
    return {k: v.clone() for k, v in model.model.layers.state_dict().items()}


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_first_step_is_sparsegpt_bit_for_bit(tmp_path, pattern):
    windows = _windows(0)
    results = []
    for method in (make_method("sparsegpt"),
                   make_method("copal", history={}, grad_norms=None, options=OBS,
                               hessians=HessianState(None, tmp_path / "h", 1, "tokens"))):
        lm = LayeredModel.from_model(tiny_model())
        prune_sweep(lm, windows, method, Pattern.parse(pattern))
        results.append(_weights(lm.model))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    saved = load_file(block_file(tmp_path / "h", 0))
    # q/k/v share one input, gate/up another: four Gram matrices per LLaMA block, not seven
    assert sorted(k for k in saved if k.endswith(".gram")) == [
        "mlp.down_proj.gram", "mlp.gate_proj.gram", "self_attn.o_proj.gram",
        "self_attn.q_proj.gram"]


def test_steps_equal_the_joint_hessian_at_the_layer_level(tmp_path):
    """Two equal-sized datasets: the state's H equals the union's, whichever the weighting, so
    the OBS update equals SparseGPT-joint on the same layer inputs."""
    torch.manual_seed(0)
    inputs = [torch.randn(256, 48), torch.randn(256, 48) * 2 + 0.5]
    weight = torch.randn(32, 48)
    groups = {"x": ["x"]}
    for weighting in ("tokens", "datasets"):
        previous = None
        for step, x in enumerate(inputs, start=1):
            target = tmp_path / f"{weighting}-{step}"
            state = HessianState(previous, target, step, weighting)
            hessian = state.update(0, {"x": (x.t() @ x, len(x))}, groups)["x"]
            previous = target
        union = torch.cat(inputs)
        joint = union.t() @ union * (2.0 / len(union))
        torch.testing.assert_close(hessian, joint, rtol=1e-5, atol=1e-5)
        ours = obs_prune(weight, hessian, Pattern.parse("2:4"), block_size=16, dampening=0.01)
        theirs = obs_prune(weight, joint, Pattern.parse("2:4"), block_size=16, dampening=0.01)
        assert torch.equal(ours == 0, theirs == 0)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_dense_inputs_make_the_state_the_union_hessian(tmp_path):
    """calibration_inputs = "dense": every step's Gram comes from the dense model's block
    inputs, so two steps' state is the Gram of one step on both datasets (up to summation
    order): SparseGPT-joint's Hessian with dense calibration inputs, whatever the order."""
    dense = CopalOptions(weight_update="obs", calibration_inputs="dense")
    a, b = _windows(1), _windows(2)

    def run(steps, folder):
        previous = None
        for step, windows in enumerate(steps, start=1):
            target = tmp_path / f"{folder}-{step}"
            lm = LayeredModel.from_model(tiny_model())
            method = make_method("copal", history={}, grad_norms=None, options=dense,
                                 hessians=HessianState(previous, target, step, "tokens"))
            assert method.dense_inputs
            prune_sweep(lm, windows, method, Pattern.parse("2:4"))
            previous = target
        return previous

    steps, joint = run([a, b], "steps"), run([torch.cat([a, b])], "joint")
    for index in range(2):
        got, want = load_file(block_file(steps, index)), load_file(block_file(joint, index))
        assert got.keys() == want.keys()
        for key in got:
            torch.testing.assert_close(got[key], want[key].to(got[key].dtype), rtol=1e-5,
                                       atol=1e-4)


def test_continue_from_the_state_alone_equals_one_process(checkpoint, corpus, corpus_b,
                                                          tmp_path):
    first = prune_checkpoint(str(checkpoint), str(corpus), tmp_path / "s1", method="copal",
                             pattern="2:4", options=OBS, log=lambda *_: None, **WINDOWS)
    state = first / "copal-state.safetensors"
    history, meta = load_state(state)
    assert history == {} and meta["weight_update"] == "obs" and meta["step_weighting"] == "tokens"
    second = continue_checkpoint(str(state), str(corpus_b), tmp_path / "s2", log=lambda *_: None)
    assert len(list(hessian_dir(second / "copal-state.safetensors").iterdir())) == 2

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from copal.data import make_dataset

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    pruner = ContinualPruner(model, method="copal", pattern="2:4", options=OBS)
    for source in (corpus, corpus_b):
        pruner.step(make_dataset(str(source), tokenizer, num_test=0, seed=0, **WINDOWS).calibration)
    pruner.save_state(tmp_path / "in-process.safetensors", datasets=["a", "b"])
    written = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32)
    for (name, got), want in zip(written.model.layers.state_dict().items(),
                                 model.model.layers.state_dict().values()):
        assert torch.equal(got, want), name
    for index in range(2):
        a = load_file(block_file(hessian_dir(second / "copal-state.safetensors"), index))
        b = load_file(block_file(hessian_dir(tmp_path / "in-process.safetensors"), index))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_linear_step_weights_continue_from_the_state(checkpoint, corpus, corpus_b, tmp_path):
    """step_weights = "linear" (lambda_s = s) needs no list up front, so copal continue takes
    it: after two steps the state holds G_1 + 2 G_2 over n_1 + 2 n_2 tokens."""
    argv = ["--num-calibration", "4", "--seq-len", "32"]
    assert main(["prune", "--model", str(checkpoint), "--data", str(corpus), "--method", "copal",
                 "--weight-update", "obs", "--step-weights", "linear", "--pattern", "2:4",
                 "--out", str(tmp_path / "s1"), *argv]) == 0
    first = tmp_path / "s1" / "copal-state.safetensors"
    assert main(["continue", "--state", str(first), "--data", str(corpus_b),
                 "--out", str(tmp_path / "s2")]) == 0
    second = tmp_path / "s2" / "copal-state.safetensors"
    meta = load_state(second)[1]
    assert meta["step_weights"] == "linear" and len(meta["datasets"]) == 2
    one, two = (load_file(block_file(hessian_dir(state), 0)) for state in (first, second))
    tokens = 4 * 32
    assert float(one["self_attn.q_proj.total"]) == tokens
    assert float(two["self_attn.q_proj.total"]) == tokens + 2 * tokens
    assert CopalOptions(step_weights="linear").label == "[sumsq,nograd,lambda=linear,raw]"
    assert [CopalOptions(step_weights="linear").step_weight(s) for s in (1, 2, 3)] == [1, 2, 3]


def test_a_state_it_cannot_serve_is_refused_naming_the_file(checkpoint, corpus, corpus_b,
                                                            tmp_path, capsys):
    first = prune_checkpoint(str(checkpoint), str(corpus), tmp_path / "s1", method="copal",
                             pattern="50%", options=OBS, log=lambda *_: None, **WINDOWS)
    state = first / "copal-state.safetensors"
    broken = tmp_path / "broken"
    shutil.copytree(first, broken)
    block = block_file(hessian_dir(broken / "copal-state.safetensors"), 1)
    block.write_bytes(block.read_bytes()[:100])
    assert main(["continue", "--state", str(broken / "copal-state.safetensors"),
                 "--data", str(corpus_b), "--out", str(tmp_path / "o1")]) == 2
    assert str(block) in capsys.readouterr().err
    block.unlink()
    assert main(["continue", "--state", str(broken / "copal-state.safetensors"),
                 "--data", str(corpus_b), "--out", str(tmp_path / "o2")]) == 2
    assert f"{block}: missing" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # a block of step 1 where step 2's is expected
    with pytest.raises(HessianStateError, match="holds 1 step"):
        state_2 = HessianState(hessian_dir(state), tmp_path / "h3", 3, "tokens")
        state_2.update(0, {"self_attn.q_proj": (torch.eye(32), 4)},
                       {"self_attn.q_proj": ["self_attn.q_proj"]})


def test_a_state_file_and_blocks_of_another_run_are_refused(checkpoint, corpus, corpus_b, tmp_path,
                                                            capsys):
    """The state file records the step that wrote its blocks: a file beside another run's
    folder (a copy gone wrong, or a kill between the two moves) is refused, never used."""
    runs = [prune_checkpoint(str(checkpoint), str(source), tmp_path / name, method="copal",
                             pattern="2:4", options=OBS, log=lambda *_: None, **WINDOWS)
            for name, source in (("a", corpus), ("b", corpus_b))]
    folders = [hessian_dir(run / "copal-state.safetensors") for run in runs]
    shutil.rmtree(folders[0])
    shutil.copytree(folders[1], folders[0])
    assert main(["continue", "--state", str(runs[0] / "copal-state.safetensors"),
                 "--data", str(corpus_b), "--out", str(tmp_path / "o")]) == 2
    assert "do not belong together" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_folder_where_the_blocks_would_go_is_refused_before_any_work(checkpoint, corpus,
                                                                      tmp_path, capsys):
    state = tmp_path / "elsewhere" / "run.safetensors"
    hessian_dir(state).mkdir(parents=True)
    (hessian_dir(state) / "notes.txt").write_text("mine")
    argv = ["prune", "--model", str(checkpoint), "--data", str(corpus), "--method", "copal",
            "--weight-update", "obs", "--pattern", "2:4", "--num-calibration", "4",
            "--seq-len", "32", "--state-out", str(state)]
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert "without its state file, or is not copal's" in capsys.readouterr().err
    assert (hessian_dir(state) / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists()
    (hessian_dir(state) / "notes.txt").unlink()
    hessian_dir(state).rmdir()
    assert main(argv + ["--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in state.parent.iterdir()) == [state.name, hessian_dir(state).name]
    assert main(argv + ["--out", str(tmp_path / "o2")]) == 2  # exists: --overwrite replaces it
    assert main(argv + ["--out", str(tmp_path / "o2"), "--overwrite"]) == 0
    assert len(list(hessian_dir(state).iterdir())) == 2


@pytest.mark.parametrize("pattern,block_size", [("2:3", None), ("2:4", 6)])
def test_nm_groups_straddling_obs_blocks_are_refused_before_any_work(pattern, block_size):
    """SparseGPT takes N:M groups every M columns of each 128-column block (as upstream)."""
    from copal.continual import RunSpec

    with pytest.raises(ValueError, match="not a multiple of M"):
        if block_size is None:
            RunSpec("sparsegpt", "restart", pattern)
        else:
            RunSpec("copal", "continual", pattern,
                    options=CopalOptions(weight_update="obs", block_size=block_size))


def test_a_state_from_before_the_obs_update_is_mask_only(checkpoint, corpus, tmp_path):
    import json as json_module

    from safetensors import safe_open
    from safetensors.torch import save_file

    first = prune_checkpoint(str(checkpoint), str(corpus), tmp_path / "s1", method="copal",
                             pattern="50%", log=lambda *_: None, **WINDOWS)
    state = first / "copal-state.safetensors"
    with safe_open(str(state), framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    meta = json_module.loads(header["metadata"])
    for key in ("weight_update", "step_weighting", "dampening", "block_size", "hessian_id"):
        del meta[key]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=dict(header, metadata=json_module.dumps(meta)))
    assert load_state(old)[1]["weight_update"] == "none"


def test_cholesky_failure_retries_with_more_dampening_and_says_so():
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = obs_prune(torch.ones(4, 2), indefinite, Pattern.parse("50%"), block_size=2,
                           dampening=0.01, layer="block 0 x")
    assert [str(w.message).split(";")[0] for w in caught] == [
        f"block 0 x: the Cholesky factorisation failed with dampening {d:g}" for d in (0.01, 0.1)]
    assert int((pruned == 0).sum()) == 4


@pytest.mark.parametrize("argv,message", [
    (["--weight-update", "obs", "--aggregation", "max"], "--aggregation: option(s) of COPAL's mask"),
    (["--step-weighting", "datasets"], "--step-weighting: option(s) of COPAL's OBS variant"),
    (["--method", "wanda", "--weight-update", "obs"], "--weight-update: COPAL option(s)"),
    (["--weight-update", "obs", "--dampening", "-1"], "dampening must be a positive number"),
    (["--obs-block-size", "128"], "--obs-block-size: option(s) of COPAL's OBS variant"),
    (["--weight-update", "obs", "--gradient", "none"], "--gradient: option(s) of COPAL's mask-only"),
], ids=["obs-aggregation", "weighting-mask-only", "obs-wanda", "dampening", "default-obs-flag",
        "default-mask-flag"])
def test_obs_options_are_honoured_or_refused(checkpoint, corpus, tmp_path, capsys, argv,
                                             message):
    method = [] if "--method" in argv else ["--method", "copal"]
    assert main(["prune", "--model", str(checkpoint), "--data", str(corpus), "--out",
                 str(tmp_path / "o"), "--num-calibration", "4", "--seq-len", "32",
                 *method, *argv]) == 2
    assert message in capsys.readouterr().err


def test_experiment_keeps_the_obs_state_and_it_continues(checkpoint, corpus, corpus_b, tmp_path,
                                                        monkeypatch):
    config = {"model": str(checkpoint), "sources": [str(corpus), str(corpus_b)],
              "num_calibration": 4, "num_test": 2, "seq_len": 32,
              "runs": [{"method": "copal", "protocol": "continual", "pattern": "2:4",
                        "weight_update": "obs"},
                       {"method": "sparsegpt", "protocol": "restart", "pattern": "2:4"}]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "exp"
    assert main(["experiment", "--config", str(path), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    copal, sparsegpt = results["runs"]
    assert copal["label"] == "copal[obs,tokens]-continual 2:4"
    assert copal["P"][0] == sparsegpt["P"][0], "step 1 is SparseGPT's"
    state = out / copal["state_file"]
    assert len(list(hessian_dir(state).iterdir())) == 2
    heldout = tmp_path / "third.txt"
    shutil.copy(corpus, heldout)
    heldout.write_text(heldout.read_text()[::-1])
    assert main(["continue", "--state", str(state), "--data", str(heldout),
                 "--out", str(tmp_path / "step3")]) == 0
    _storage_benchmark_reproduces_the_run(out, copal, tmp_path / "bench", monkeypatch)


def _storage_benchmark_reproduces_the_run(out, run, bench, monkeypatch):
    """benchmarks.hessian_storage re-prunes from the state: in fp32 it is the run's last model."""
    import sys

    from benchmarks import hessian_storage

    monkeypatch.setattr(sys, "argv", ["hessian_storage", str(out), "--state", run["state_file"],
                                      "--out", str(bench)])
    record = hessian_storage.main()
    fp32 = record["storage"]["fp32"]
    assert fp32["mask_entries_differing"] == 0 and fp32["relative_weight_change"] == 0
    assert list(fp32["perplexity"].values()) == pytest.approx(run["P"][-1], rel=1e-6)
    assert record["storage"]["bf16"]["relative_weight_change"] > 0


def test_step_benchmark_smoke_run_on_cpu(tmp_path, monkeypatch):
    """benchmarks.reconstruction_step on a tiny synthetic shape (its numbers mean nothing)."""
    import sys

    from benchmarks import reconstruction_step

    monkeypatch.setattr(sys, "argv", ["reconstruction_step", "--shape", "tiny", "--blocks", "2",
                                      "--samples", "2", "--seq", "16", "--out", str(tmp_path)])
    reconstruction_step.main()
    record = json.loads((tmp_path / "reconstruction_step.jsonl").read_text())
    assert set(record["seconds"]) == {"sparsegpt", "copal_obs_step1", "copal_obs_step2"}
    assert record["state_bytes_read_and_written_per_step"][0] > 0


def test_options_of_the_other_variant_are_refused_by_the_api():
    with pytest.raises(ValueError, match=r"aggregation do\(es\) not apply"):
        CopalOptions(weight_update="obs", aggregation="max")
    with pytest.raises(ValueError, match="they are options of the OBS update"):
        CopalOptions(dampening=0.1)
