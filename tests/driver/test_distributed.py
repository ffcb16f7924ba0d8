"""Data parallelism on torch.distributed (gloo, CPU), launched by torchrun as users launch it:
1, 2 and 3 ranks give bit-identical checkpoints, states and perplexities (copal.distributed)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from .tiny import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
WORKER = "tests.driver.distributed_worker"


def _launch(ranks, *args, timeout=300):
    """``python -m MODULE_OR_ARGS`` alone (ranks None) or under torchrun with ``ranks``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0", PYTHONPATH=path)
    command = [sys.executable, "-m"]
    if ranks is not None:
        command += ["torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                    str(29500 + os.getpid() % 1000 + ranks), "-m"]
    return subprocess.run(command + [str(a) for a in args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


def _tensors_and_metadata(path: Path):
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    # identifiers drawn at random for each run (they tie a state to its second-order blocks)
    metadata.pop("id", None)
    if "metadata" in metadata:
        inner = json.loads(metadata["metadata"])
        inner.pop("hessian_id", None)
        metadata["metadata"] = inner
    return tensors, metadata


def _assert_same_outputs(expected: Path, actual: Path, minimum: int = 20):
    files = sorted(p.relative_to(expected) for p in expected.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(actual) for p in actual.rglob("*.safetensors"))
    assert len(files) > minimum
    for name in files:
        (a, meta_a), (b, meta_b) = _tensors_and_metadata(expected / name), \
            _tensors_and_metadata(actual / name)
        assert meta_a == meta_b, name
        assert a.keys() == b.keys(), name
        for key in a:  # bit for bit: the bit patterns, signed zeros included
            assert a[key].dtype == b[key].dtype and torch.equal(
                a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), \
                (name, key)


@pytest.fixture(scope="module")
def single(checkpoint, corpus, corpus_b, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process")
    result = _launch(None, WORKER, checkpoint, corpus, corpus_b, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_give_the_single_process_checkpoints_states_and_perplexities(
        single, checkpoint, corpus, corpus_b, tmp_path, ranks):
    """Wanda (50%), SparseGPT (2:4), COPAL with the gradient pass (4:8) and COPAL's OBS update
    (50%), each COPAL state continued with a second dataset, every output evaluated: 5
    calibration and 5 test windows of batch 1 split 3+2 or 2+2+1 over the ranks."""
    result = _launch(ranks, WORKER, checkpoint, corpus, corpus_b, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_outputs(single, tmp_path)
    assert json.loads((tmp_path / "perplexities.json").read_text()) == \
        json.loads((single / "perplexities.json").read_text())


def test_mixture_of_experts_under_torchrun(corpus, corpus_b, tmp_path):
    """Mixtral with 16 experts and one per token: an expert's Linears get statistics from some
    chunks only, a different number on each rank. Wanda and COPAL-OBS (continued) on 2 ranks
    give the single process's checkpoints, states and perplexities, bit for bit."""
    model = tiny_checkpoint(tmp_path / "model", "mixtral", num_local_experts=16,
                            num_experts_per_tok=1)
    for ranks in (None, 2):
        result = _launch(ranks, WORKER, model, corpus, corpus_b, tmp_path / f"ranks-{ranks}",
                         "experts")
        assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_outputs(tmp_path / "ranks-None", tmp_path / "ranks-2", minimum=10)
    assert json.loads((tmp_path / "ranks-2" / "perplexities.json").read_text()) == \
        json.loads((tmp_path / "ranks-None" / "perplexities.json").read_text())


def test_a_failing_rank_stops_every_rank(checkpoint, corpus, corpus_b, tmp_path):
    started = time.perf_counter()
    out = tmp_path / "out"
    result = _launch(2, WORKER, checkpoint, corpus, corpus_b, out, "fail", timeout=240)
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
    assert time.perf_counter() - started < 200  # torchrun stopped rank 0, which did not hang
    assert not out.exists() or list(out.iterdir()) == []  # rank 0 left nothing half-written


def test_more_ranks_than_chunks_is_refused_before_any_work(checkpoint, corpus, tmp_path):
    result = _launch(3, "copal", "prune", "--model", checkpoint, "--data", corpus, "--out",
                     tmp_path / "out", "--num-calibration", 2, "--seq-len", 32,
                     "--batch-size", 1)
    assert result.returncode != 0
    assert "2 calibration windows make 2 chunk(s) of batch size 1, fewer than the 3 ranks" \
        in result.stderr
    assert not (tmp_path / "out").exists()


def test_experiment_under_torchrun_matches_one_process(checkpoint, corpus, corpus_b, tmp_path):
    """The CLI's experiment (lazy model, a run store that rank 0 writes and every rank reads,
    cascade reading back pruned blocks, COPAL's OBS state) on 1 and 2 ranks: the same P
    matrices, bit for bit, and rank 0 alone writes the results."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model": str(checkpoint), "sources": [str(corpus), str(corpus_b)], "num_calibration": 4,
        "num_test": 3, "seq_len": 32, "batch_size": 1,
        "runs": [{"method": "wanda", "protocol": "cascade", "pattern": "50%"},
                 {"method": "copal", "protocol": "continual", "pattern": "2:4",
                  "weight_update": "obs"}]}))
    outputs = {}
    for ranks in (None, 2):
        out = tmp_path / f"ranks-{ranks}"
        result = _launch(ranks, "copal", "experiment", "--config", config, "--out", out)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[ranks] = json.loads((out / "results.json").read_text())
        assert result.stdout.count("results ") == 1  # one rank prints
    one, two = outputs[None], outputs[2]
    assert one["dense"] == two["dense"]
    assert [run["P"] for run in one["runs"]] == [run["P"] for run in two["runs"]]
    assert [run["label"] for run in two["runs"]] == ["wanda-cascade 50%",
                                                     "copal[obs,tokens]-continual 2:4"]
