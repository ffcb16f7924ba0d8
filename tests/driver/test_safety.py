"""Nothing lost, nothing silently wrong (issue 14): outputs that would destroy what the user did
not ask to destroy, option abbreviations, interrupted and killed runs, states that must continue
exactly what they started, inputs refused before any work, options honoured or refused."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from copal.api import ContinualPruner, continue_checkpoint, prune_checkpoint
from copal.cli import main
from copal.data import DataError, make_dataset
from copal.interop import portable_config
from copal.methods import Pattern
from copal.model import LayeredModel
from copal.outputs import MARKER
from copal.state import load_state

from .tiny import tiny_checkpoint, tiny_model, word_tokenizer

WINDOWS = ["--num-calibration", "4", "--seq-len", "32"]
ROOT = Path(__file__).resolve().parents[2]


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


def _prune(checkpoint, corpus, out, *extra):
    return main(["prune", "--model", str(checkpoint), "--data", str(corpus), "--out", str(out),
                 *WINDOWS, *extra])


def test_outputs_that_would_destroy_the_wrong_thing_are_refused(checkpoint, corpus, tmp_path,
                                                                monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    cases = {"": "empty path", ".": "working directory", str(tmp_path): "working directory",
             "/": "working directory", str(home): "home directory"}
    for out, message in cases.items():
        assert _prune(checkpoint, corpus, out, "--overwrite") == 2, out
        assert message in capsys.readouterr().err
    assert _files(work) == ["notes.txt"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    assert _prune(checkpoint, corpus, foreign, "--overwrite") == 2
    assert "holds no checkpoint written by copal" in capsys.readouterr().err
    assert _files(foreign) == ["data.bin"]
    (tmp_path / "a-file").write_text("x")
    assert _prune(checkpoint, corpus, tmp_path / "a-file", "--overwrite") == 2
    assert "is a file" in capsys.readouterr().err

    out = tmp_path / "pruned"
    assert _prune(checkpoint, corpus, out) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["method"] == "wanda" and marker["windows"]["num_calibration"] == 4
    assert _prune(checkpoint, corpus, out, "--method", "magnitude") == 2  # no --overwrite
    assert main(["prune", "--model", str(checkpoint), "--method", "magnitude", "--out", str(out),
                 "--overwrite"]) == 0  # copal's own output is replaced, once the new one is done
    assert json.loads((out / MARKER).read_text())["method"] == "magnitude"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.")]


def test_options_are_never_abbreviated_and_files_never_silently_replaced(checkpoint, corpus,
                                                                        tmp_path, capsys):
    out = tmp_path / "step1"
    assert _prune(checkpoint, corpus, out, "--method", "copal") == 0
    state = out / "copal-state.safetensors"
    before = state.read_bytes()
    with pytest.raises(SystemExit):  # --state is not --state-out
        _prune(checkpoint, corpus, tmp_path / "other", "--method", "copal", "--state", str(state))
    with pytest.raises(SystemExit):
        main(["experiment", "--conf", "x.toml"])
    assert _prune(checkpoint, corpus, tmp_path / "other", "--method", "copal",
                  "--state-out", str(state)) == 2
    assert "already exists" in capsys.readouterr().err
    assert state.read_bytes() == before and not (tmp_path / "other").exists()
    # a state inside the input, or where no file can be written, is refused before any work
    assert _prune(checkpoint, corpus, tmp_path / "other", "--method", "copal",
                  "--state-out", str(checkpoint / "s.safetensors")) == 2
    assert "inside the input" in capsys.readouterr().err
    (tmp_path / "blocker").write_text("a file, not a folder")
    assert _prune(checkpoint, corpus, tmp_path / "other", "--method", "copal",
                  "--state-out", str(tmp_path / "blocker" / "s.safetensors")) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert not list(checkpoint.glob("s.safetensors"))


def _child(code, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(process, ready, sig, timeout=120):
    """Send ``sig`` as soon as ``ready()`` is true."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.01)
    process.send_signal(sig)
    return process.communicate(timeout=timeout)


PRUNE_CHILD = """
import sys
from copal.cli import main
sys.exit(main(["prune", "--model", sys.argv[1], "--data", sys.argv[2], "--out", sys.argv[3],
               "--method", "sparsegpt", "--num-calibration", "64", "--seq-len", "64"]))
"""


def test_killed_prune_leaves_nothing_that_outlives_it(tmp_path, corpus):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", layers=6)
    out = tmp_path / "out"

    def staging():
        return [p for p in tmp_path.iterdir() if p.name.startswith(".out.copal-staging-")
                and p.is_dir() and any(p.glob("model-*.safetensors"))]

    # SIGTERM: cleans up, one line, non-zero
    child = _child(PRUNE_CHILD, checkpoint, corpus, out)
    _, err = _kill_when(child, lambda: staging(), signal.SIGTERM)
    assert child.returncode == 130
    assert err.strip().splitlines()[-1] == \
        "copal prune: interrupted (SIGTERM); nothing was written", err
    assert "Traceback" not in err and not staging() and not out.exists()
    # SIGKILL: the staging folder stays behind, unclaimed; the next run removes it
    child = _child(PRUNE_CHILD, checkpoint, corpus, out)
    _kill_when(child, lambda: staging(), signal.SIGKILL)
    assert staging(), "a killed process cannot clean up"
    assert main(["prune", "--model", str(checkpoint), "--method", "magnitude",
                 "--out", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _sparsity_rows(directory, name="model.layers.0.mlp.down_proj.weight"):
    tensors = {}
    for shard in Path(directory).glob("model-*.safetensors"):
        tensors.update(load_file(shard))
    return (tensors[name] == 0).sum(1)


def test_state_keeps_the_exact_pattern_and_checks_the_model(checkpoint, corpus, corpus_b,
                                                             tmp_path, capsys):
    out = prune_checkpoint(str(checkpoint), str(corpus), tmp_path / "s1", method="copal",
                           pattern="0.625", num_calibration=4, seq_len=32, log=lambda *_: None)
    history, meta = load_state(out / "copal-state.safetensors")
    assert meta["pattern"] == "0.625" and Pattern.parse(meta["pattern"]).sparsity == 0.625
    state = out / "copal-state.safetensors"
    second = continue_checkpoint(str(state), str(corpus_b), tmp_path / "s2", log=lambda *_: None)
    assert set(_sparsity_rows(second).tolist()) == {int(48 * 0.625)}  # down_proj: in = 48

    # the model moved: --model says where; a model whose weights were swapped is refused
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    continue_checkpoint(str(state), str(corpus_b), tmp_path / "s3", model=str(moved),
                        log=lambda *_: None)
    other = tiny_checkpoint(tmp_path / "other", seed=7)
    for shard in moved.glob("*.safetensors*"):
        shard.unlink()
    for shard in other.glob("*.safetensors*"):
        shutil.copy(shard, moved / shard.name)
    assert main(["continue", "--state", str(state), "--data", str(corpus_b),
                 "--out", str(tmp_path / "s4"), "--model", str(moved)]) == 2
    assert "is not the dense model the state" in capsys.readouterr().err
    # a state of a 2-block model against a 3-block one: refused before any work
    deeper = tiny_checkpoint(tmp_path / "deeper", layers=3)
    assert main(["continue", "--state", str(state), "--data", str(corpus_b),
                 "--out", str(tmp_path / "s5"), "--model", str(deeper)]) == 2
    assert "do not match the model's 3 blocks" in capsys.readouterr().err
    assert not (tmp_path / "s4").exists() and not (tmp_path / "s5").exists()


def test_data_that_cannot_serve_the_run_is_refused(tmp_path, corpus):
    tokenizer = word_tokenizer(96)
    text = corpus.read_text()
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "latin1.txt").write_bytes(text.encode() + "caf\xe9".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02" + text.encode())
    for name, message in (("a.txt.gz", "gzip-compressed"), ("latin1.txt", "not UTF-8"),
                          ("binary.txt", "binary file")):
        with pytest.raises(DataError, match=message):
            make_dataset(str(tmp_path / name), tokenizer, num_calibration=2, num_test=1, seq_len=16)
    with pytest.raises(DataError, match="distinct windows"):
        make_dataset(str(corpus), tokenizer, num_calibration=5000, num_test=1, seq_len=64)
    with pytest.raises(DataError, match="ask for at most"):
        make_dataset(str(corpus), tokenizer, num_calibration=1, num_test=500, seq_len=64)
    for bad in (dict(num_calibration=-1), dict(seq_len=1)):
        with pytest.raises(ValueError, match="must be an integer"):
            make_dataset(str(corpus), tokenizer, **{"num_calibration": 1, "num_test": 1,
                                                    "seq_len": 16, **bad})


def test_checks_come_before_any_work(checkpoint, corpus, tmp_path, monkeypatch, capsys):
    import copal.continual

    def no_gradient_pass(*args, **kwargs):
        raise AssertionError("the gradient pass ran before the input was checked")

    monkeypatch.setattr(copal.continual, "gradient_norms", no_gradient_pass)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    checks = [
        (["--out", str(taken)], "already exists and is not empty"),
        (["--out", str(tmp_path / "o"), "--seq-len", "4096"], "max_position_embeddings"),
        (["--out", str(tmp_path / "o"), "--pattern", "5:32"], "does not divide layer block 0"),
        (["--out", str(tmp_path / "o"), "--device", "cuda:7"], "device 'cuda:7'"),
        (["--out", str(tmp_path / "o"), "--num-calibration", "0"], "at least 1"),
    ]
    for extra, message in checks:
        defaults = {"--num-calibration": "4", "--seq-len": "32"}
        for option in extra[::2]:
            defaults.pop(option, None)
        argv = ["prune", "--model", str(checkpoint), "--data", str(corpus), "--method", "copal",
                "--gradient", "lm", *[x for pair in defaults.items() for x in pair], *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_broken_checkpoints_get_one_line_naming_the_file(checkpoint, corpus, tmp_path, capsys):
    def broken(name, damage):
        copy = tmp_path / name
        shutil.copytree(checkpoint, copy)
        damage(copy)
        assert _prune(copy, corpus, tmp_path / f"out-{name}") == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "config.json" in broken("config", lambda d: (d / "config.json").write_text("{oops"))
    assert "weight_map" in broken("index", lambda d: (
        d / "model.safetensors.index.json").write_text('{"metadata": {}}'))

    def reshape(directory):
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        shard = directory / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
        tensors = load_file(shard)
        tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
        save_file(tensors, shard, metadata={"format": "pt"})

    err = broken("shape", reshape)
    assert "model.layers.1.mlp.up_proj.weight" in err and "[3, 3]" in err


def test_nan_is_refused_naming_the_layer(tmp_path, corpus, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    source = tmp_path / "nan"
    model.save_pretrained(source)
    word_tokenizer(96).save_pretrained(source)
    assert _prune(source, corpus, tmp_path / "out") == 2
    assert "block 1 mlp.up_proj: weight contains NaN or Inf" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(source), "--data", str(corpus), "--num-test", "1",
                 "--seq-len", "32"]) == 2
    assert "is nan: the model gives NaN or Inf logits" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["--method", "wanda", "--group", "layer"], "--group: COPAL option(s), which --method wanda"),
    (["--method", "sparsegpt", "--aggregation", "max"], "--aggregation: COPAL option(s)"),
    (["--method", "copal", "--group", "layer", "--pattern", "2:4"], "applies to unstructured"),
    (["--method", "magnitude"], "magnitude prunes by |W| alone"),
    (["--method", "wanda", "--state-out", "s.safetensors"], "only --method copal writes a state"),
    (["--offload-activations"], "on the CPU they are there already"),
], ids=["group-wanda", "aggregation-sparsegpt", "group-nm", "magnitude-data", "state-wanda",
        "offload-cpu"])
def test_every_option_is_honoured_or_refused(checkpoint, corpus, tmp_path, capsys, argv, message):
    assert _prune(checkpoint, corpus, tmp_path / "out", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_continual_pruner_refuses_placement_and_restores_after_a_failure(monkeypatch):
    with torch.device("meta"):
        meta = tiny_model()
    with pytest.raises(ValueError, match="held on the host"):
        ContinualPruner(meta)
    model = tiny_model()
    pruner = ContinualPruner(model, method="copal", pattern="2:4")
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    pruner.step(windows)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="vocabulary"):
        pruner.step(windows + 1000)
    load_block = LayeredModel.load_block

    def failing(self, index, *args, **kwargs):
        if index == 1:
            raise RuntimeError("device lost (simulated)")
        return load_block(self, index, *args, **kwargs)

    monkeypatch.setattr(LayeredModel, "load_block", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        pruner.step(windows.flip(0))
    monkeypatch.undo()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "block 0 is restored"
    assert pruner.steps == 1 and all(len(layer.acts) == 1 for layer in pruner.history.values())


def test_masks_do_not_depend_on_the_batch_size_in_block_0_and_are_reproducible():
    """What docs/usage.md promises about determinism: block 0's statistics are summed one window
    at a time, so its masks are the same for every batch size; later blocks see activations that
    a batched forward rounds differently, so their masks may differ on near-ties; the same batch
    size gives the same masks, run after run."""
    from copal.methods import make_method
    from copal.sweep import prune_sweep

    windows = torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(1))
    masks = {}
    for batch, repeat in ((1, 0), (3, 0), (3, 1)):
        lm = LayeredModel.from_model(tiny_model(hidden=64, intermediate=96))
        prune_sweep(lm, windows, make_method("wanda"), Pattern.parse("2:4"), batch_size=batch)
        masks[batch, repeat] = [[lin.weight == 0 for lin in lm.linears(block).values()]
                                for block in lm.blocks]
    assert all(torch.equal(a, b) for a, b in zip(masks[1, 0][0], masks[3, 0][0]))
    for block_a, block_b in zip(masks[3, 0], masks[3, 1]):
        assert all(torch.equal(a, b) for a, b in zip(block_a, block_b))


def test_mount_points_are_never_outputs(tmp_path):
    from copal.outputs import OutputError, refuse_dangerous

    mounts = [Path(p) for p in ("/proc", "/sys", "/dev") if os.path.ismount(p)]
    if not mounts:
        pytest.skip("no mount point to try")
    with pytest.raises(OutputError, match="mount point"):
        refuse_dangerous(mounts[0], "output")
    assert refuse_dangerous(tmp_path / "new", "output") == (tmp_path / "new").resolve()


def test_experiment_output_inside_the_model_is_refused(checkpoint, corpus, capsys):
    before = _files(checkpoint)
    assert main(["experiment", "--out", str(checkpoint / "results"),
                 "--set", f'model="{checkpoint}"', "--set", f'sources=["{corpus}"]']) == 2
    assert "lies inside the model" in capsys.readouterr().err
    assert _files(checkpoint) == before


def test_experiment_and_report_outputs_keep_what_is_not_theirs(checkpoint, corpus, tmp_path,
                                                               monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    (mine / "results.json").write_text('{"mine": 1}')
    (mine / "state-mine.safetensors").write_text("not a state")
    base = ["--set", f'model="{checkpoint}"', "--set", f'sources=["{corpus}"]', "--set",
            'runs=[{"method": "magnitude", "protocol": "restart"}]', "--set", "num_test=1",
            "--set", "seq_len=32", "--set", "num_calibration=1"]
    for extra in ([], ["--overwrite"]):
        assert main(["experiment", "--out", str(mine), *base, *extra]) == 2
        assert "holds no results of copal experiment" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["report.md", "results.json",
                                                      "state-mine.safetensors"]
    assert (mine / "report.md").read_text() == "my notes"
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "--out", ".", *base]) == 2
    assert "working directory" in capsys.readouterr().err

    out = tmp_path / "exp"
    assert main(["experiment", "--out", str(out), *base]) == 0
    assert not (out / ".copal-progress").exists()
    assert main(["report", str(out), "--out", str(mine)]) == 2
    assert "holds no report or results of copal" in capsys.readouterr().err
    assert main(["report", str(out), "--out", str(tmp_path / "a-report")]) == 0
    assert main(["report", str(out), "--out", str(tmp_path / "a-report")]) == 0  # its own


def test_continue_never_replaces_its_input_state(checkpoint, corpus, corpus_b, tmp_path, capsys):
    first = tmp_path / "c1"
    assert _prune(checkpoint, corpus, first, "--method", "copal") == 0
    state = first / "copal-state.safetensors"
    before = state.read_bytes()
    for extra in (["--out", str(first), "--overwrite"],
                  ["--out", str(tmp_path / "c2"), "--state-out", str(state), "--overwrite"]):
        assert main(["continue", "--state", str(state), "--data", str(corpus_b), *extra]) == 2
        assert "input" in capsys.readouterr().err
    assert state.read_bytes() == before
    assert main(["continue", "--state", str(first), "--data", str(corpus_b),
                 "--out", str(tmp_path / "c3")]) == 2
    assert "is a directory, not a COPAL state file" in capsys.readouterr().err
    assert main(["continue", "--state", str(state), "--data", str(corpus_b), "--dtype",
                 "bfloat16", "--out", str(tmp_path / "c4")]) == 2
    assert "its steps computed in float32" in capsys.readouterr().err


def test_failed_run_neither_leaves_nor_replaces_a_state(checkpoint, corpus, tmp_path, monkeypatch):
    import copal.checkpoint

    kept = tmp_path / "kept.safetensors"
    assert _prune(checkpoint, corpus, tmp_path / "first", "--method", "copal",
                  "--state-out", str(kept)) == 0
    before = kept.read_bytes()

    def disk_full(*args):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(copal.checkpoint, "replace_directory", disk_full)
    assert _prune(checkpoint, corpus, tmp_path / "second", "--method", "copal",
                  "--state-out", str(kept), "--overwrite", "--seed", "1") == 2
    assert kept.read_bytes() == before
    assert not (tmp_path / "second").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_is_the_input_in_its_own_dtype_with_its_files_and_permissions(tmp_path, corpus):
    model = tiny_model().to(torch.bfloat16)
    model.generation_config.pad_token_id = 1
    source = tmp_path / "bf16"
    model.save_pretrained(source)
    word_tokenizer(96).save_pretrained(source)
    old = os.umask(0o022)
    try:
        assert _prune(source, corpus, tmp_path / "out", "--method", "sparsegpt") == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert (out.stat().st_mode & 0o777) == 0o755
    assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()} == {
        path.name: 0o644 for path in out.iterdir()}, "every file of the user's umask"
    for shard in out.glob("model-*.safetensors"):
        assert {t.dtype for t in load_file(shard).values()} == {torch.bfloat16}
    for name in ("generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    # the input's, plus the sparsity mark and the keys transformers 4.x reads (copal.interop)
    config = json.loads((out / "config.json").read_text())
    assert config.pop("sparsity_config")["sparsity_structure"] == "unstructured"
    assert config.pop("copal_pruning")["method"] == "sparsegpt"
    assert config == portable_config(json.loads((source / "config.json").read_text()))
    marker = json.loads((out / MARKER).read_text())
    assert marker["datasets"] == [str(corpus.resolve())] and marker["dtype"] == "float32"


def test_save_dtype_writes_every_float_tensor_in_it_and_says_so(tmp_path, corpus, capsys):
    model = tiny_model().to(torch.bfloat16)
    source = tmp_path / "bf16"
    model.save_pretrained(source)
    word_tokenizer(96).save_pretrained(source)
    assert _prune(source, corpus, tmp_path / "out", "--save-dtype", "float16") == 0
    out = tmp_path / "out"
    for shard in out.glob("model-*.safetensors"):
        assert {t.dtype for t in load_file(shard).values()} == {torch.float16}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16"
    assert "tensors F16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _prune(source, corpus, tmp_path / "other", "--save-dtype", "int8")
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_checkpoints_whose_config_does_not_match_their_tensors(checkpoint, corpus, tmp_path,
                                                               capsys):
    fewer = tmp_path / "fewer"
    shutil.copytree(checkpoint, fewer)
    config = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1)))
    assert _prune(fewer, corpus, tmp_path / "out") == 2
    assert "does not use" in capsys.readouterr().err
    integer = tmp_path / "integer"
    shutil.copytree(checkpoint, integer)
    index = json.loads((integer / "model.safetensors.index.json").read_text())
    shard = integer / index["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.ones(48, 32, dtype=torch.int32)
    save_file(tensors, shard, metadata={"format": "pt"})
    assert _prune(integer, corpus, tmp_path / "out") == 2
    assert "stored as I32, not a float dtype" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--device", "cpu:1"], "the CPU is one device"),
    (["--seed", "1", "--seed", "2"], "--seed is given twice"),
    (["--batch-size", "abc"], "invalid batch size"),
    (["--nonsense"], "copal prune: error: unrecognized arguments: --nonsense"),
], ids=["cpu-index", "twice", "batch-size", "unknown"])
def test_cli_errors_are_one_line_naming_the_verb(checkpoint, corpus, tmp_path, capsys, argv,
                                                 message):
    try:
        code = _prune(checkpoint, corpus, tmp_path / "out", *argv)
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_config_files_and_sources_are_checked(tmp_path, corpus):
    from copal.experiment import ExperimentConfig

    def load(name, text):
        (tmp_path / name).write_text(text)
        return ExperimentConfig.load(tmp_path / name)

    with pytest.raises(ValueError, match="a .toml or .json file"):
        load("c.yaml", "{}")
    with pytest.raises(ValueError, match="list of tables"):
        load("c.toml", '[runs]\nmethod = "wanda"\nprotocol = "restart"\n')
    with pytest.raises(ValueError, match="seed must be an integer"):
        load("s.json", '{"seed": 1.5}')
    shutil.copy(corpus, tmp_path / "a.txt")
    with pytest.raises(ValueError, match="named once"):
        load("d.json", json.dumps({"sources": ["a.txt", str(tmp_path / "a.txt")]}))
    with pytest.raises(ValueError, match="joint protocol is restart"):
        load("m.json", json.dumps({"runs": [{"method": "magnitude", "protocol": "joint"}]}))
    config = load("p.json", json.dumps({"runs": [{"method": "wanda", "protocol": "restart",
                                                   "pattern": "0.5"}]}))
    assert config.runs[0].label == "wanda-restart 50%"
    (tmp_path / "u16.txt").write_bytes("some text".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        make_dataset(str(tmp_path / "u16.txt"), word_tokenizer(96), num_calibration=1)
