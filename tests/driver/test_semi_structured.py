"""The sparsity mark in a written config, and the 2:4 loader (semi-structured sparse weights: on a
CUDA GPU against the dense-masked model; elsewhere a clear error)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from copal.api import prune_checkpoint
from copal.interop import portable_config
from copal.semi_structured import is_exact_2of4, load_semi_structured

from .tiny import tiny_checkpoint

WINDOWS = dict(num_calibration=4, seq_len=32, seed=0)
GPU = pytest.mark.skipif(not (torch.cuda.is_available()
                              and torch.cuda.get_device_capability()[0] >= 8),
                         reason="needs a CUDA GPU of compute capability 8.0+")


@pytest.mark.parametrize("method, pattern, structure", [("wanda", "2:4", "2:4"),
                                                         ("magnitude", "60%", "unstructured")])
def test_written_config_marks_the_sparsity(checkpoint, corpus, tmp_path, method, pattern,
                                           structure):
    data = dict(data=str(corpus), **WINDOWS) if method == "wanda" else dict(data=None)
    out = prune_checkpoint(str(checkpoint), out_dir=tmp_path / "out", method=method,
                           pattern=pattern, log=lambda *_: None, **data)
    written = json.loads((out / "config.json").read_text())
    mark = written["sparsity_config"]
    assert mark["format"] == "dense" and mark["sparsity_structure"] == structure
    assert mark["targets"] == ["Linear"] and mark["ignore"] == ["lm_head"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    linears = [m.weight for layer in model.model.layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in linears)
    assert mark["global_sparsity"] == zeros / sum(w.numel() for w in linears)
    pruning = written["copal_pruning"]
    assert pruning["method"] == method and set(pruning["sparsity_by_layer_type"]) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    # transformers keeps the mark as it reads the config, and writes it back
    assert AutoConfig.from_pretrained(out).sparsity_config["sparsity_structure"] == structure
    # the rest is the input's, with the keys transformers 4.x reads added (copal.interop)
    dense = json.loads((checkpoint / "config.json").read_text())
    assert {k: v for k, v in written.items() if k not in ("sparsity_config", "copal_pruning")} \
        == portable_config(dense)


def test_exact_2of4_check():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_exact_2of4(weight)
    weight[0, 1] = 5.0
    assert not is_exact_2of4(weight)
    assert not is_exact_2of4(torch.zeros(2, 6))  # columns not in groups of 4


def test_loader_refuses_a_cpu_before_reading_anything(tmp_path):
    with pytest.raises(ValueError, match="CUDA GPU of compute capability 8.0"):
        load_semi_structured(tmp_path / "nothing-here", device="cpu")


@GPU
@pytest.mark.parametrize("arch,linears", [("llama", 14), ("mixtral", 2 * (4 + 4 * 3))])
def test_semi_structured_model_gives_the_dense_masked_logits(tmp_path, arch, linears):
    """Shapes the sparse kernels take (rows a multiple of 32, columns of 64): every decoder
    Linear converted (Mixtral: each expert's, on the tokens routed to it; the routers stay
    dense), logits within bf16 rounding of the dense-masked model's."""
    model_dir = tiny_checkpoint(tmp_path / "model", arch, hidden=128, intermediate=256, vocab=96)
    out = prune_checkpoint(str(model_dir), out_dir=tmp_path / "out", method="magnitude",
                           pattern="2:4", device="cuda", log=lambda *_: None)
    report = {}
    sparse = load_semi_structured(out, dtype=torch.bfloat16, report=report)
    assert set(report.values()) == {"semi-structured"} and len(report) == linears
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 96, (2, 64), device="cuda")
    with torch.no_grad():
        expected, actual = dense(ids).logits.float(), sparse(ids).logits.float()
    assert float((actual - expected).norm() / expected.norm()) < 2e-2


@GPU
def test_loader_refuses_a_checkpoint_that_is_not_2of4(checkpoint, tmp_path):
    out = prune_checkpoint(str(checkpoint), out_dir=tmp_path / "out", method="magnitude",
                           pattern="50%", log=lambda *_: None)
    with pytest.raises(ValueError, match="marks unstructured sparsity, not 2:4"):
        load_semi_structured(out)
    with pytest.raises(ValueError, match="is not 2:4"):
        load_semi_structured(checkpoint)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        load_semi_structured(checkpoint, dtype=torch.float32)
