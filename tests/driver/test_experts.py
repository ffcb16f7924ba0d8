"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): every expert pruned on the tokens
routed to it, the routers untouched, checkpoints in the per-expert layout that transformers 4
and 5 both read; an expert that no calibration token reaches is pruned by the documented rule."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from copal.api import ContinualPruner, continue_checkpoint, prune_checkpoint
from copal.methods import CopalOptions
from copal.model import LayeredModel, UnsupportedModelError

from .test_model import _blockwise_logits
from .test_pipeline import check_pattern, every_method
from .tiny import MIXTURES, tiny_model, word_tokenizer

WINDOWS = dict(num_calibration=4, seq_len=32)


def _tensors(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        if not path.name.startswith("copal-state"):
            tensors.update(load_file(str(path)))
    return tensors


def _is_router(key):  # Mixtral's and Qwen's gate, Qwen2-MoE's shared_expert_gate
    return key.endswith(("sparse_moe.gate.weight", "mlp.gate.weight", "shared_expert_gate.weight"))


def _save(model, directory):
    model.save_pretrained(directory)
    word_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch", MIXTURES)
def test_every_method_on_every_mixture(tmp_path, corpus, corpus_b, arch):
    """Each expert's three projections, the attention and Qwen2-MoE's shared expert get the
    exact pattern; the routers are written unchanged; transformers reads back what the project
    computes with (its forward equals the block-wise one on the written checkpoint); COPAL's
    states (mask-only and OBS) continue."""
    source = _save(tiny_model(arch, tied=False), tmp_path / "model")
    dense = _tensors(source)
    experts = 4 * 3 * 2  # 4 experts, 3 projections, 2 blocks
    expected = {"mixtral": 8 + experts, "qwen3_moe": 8 + experts,
                # block 1 is dense (mlp_only_layers); block 0 has a shared expert
                "qwen2_moe": 8 + experts // 2 + 3 + 3}[arch]
    ids = torch.randint(0, 90, (2, 16))
    for name, run, out in every_method(source, tmp_path, corpus, corpus_b):
        written = _tensors(out)
        assert written.keys() == dense.keys(), name  # the input's layout, key for key
        pruned = [key for key in written if key.endswith("proj.weight") or
                  (".experts." in key and key.endswith(".weight"))]
        assert len(pruned) == expected, (name, sorted(pruned))
        for key in pruned:
            check_pattern(written[key], run["pattern"], (name, key))
        routers = [key for key in written if _is_router(key)]
        assert len(routers) == 2, routers  # Qwen2-MoE: block 0's gate and shared_expert_gate
        for key in routers:
            assert torch.equal(written[key], dense[key]), (name, key)
        ignore = json.loads((out / "config.json").read_text())["sparsity_config"]["ignore"]
        assert ignore == ["lm_head", r"re:.*\.gate$"] + (
            [r"re:.*\.shared_expert_gate$"] if arch == "qwen2_moe" else []), ignore
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            theirs = reloaded(ids).logits
            ours = _blockwise_logits(LayeredModel.from_checkpoint(out, dtype=torch.float32), ids)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _route_to_two_experts(model):
    """Every router of ``model`` (one expert per token) sends each token to expert 0 or 1:
    logits (a, -a, 0, 0) with a != 0. Experts 2 and 3 get no token."""
    torch.manual_seed(1)
    direction = torch.randn(model.config.hidden_size)
    routers = [module for name, module in model.named_modules() if name.endswith("moe.gate")
               or name.endswith("mlp.gate")]
    assert len(routers) == model.config.num_hidden_layers
    for module in routers:
        weight = torch.zeros_like(module.weight)
        weight[0], weight[1] = direction, -direction
        module.weight.data.copy_(weight)
    return model


def test_experts_no_token_reaches_are_pruned_by_magnitude(tmp_path, corpus, corpus_b):
    """Experts 2 and 3 see no calibration token: Wanda's, SparseGPT's, COPAL's and COPAL-OBS's
    (continued with a second dataset) weights for them are magnitude pruning's, with no OBS
    update (H = I); experts 0 and 1 are pruned on their tokens; the run says so."""
    model = _route_to_two_experts(tiny_model("mixtral", tied=False))
    model.config.num_experts_per_tok = 1  # read when the checkpoint is loaded
    source = _save(model, tmp_path / "model")
    reference = _tensors(prune_checkpoint(str(source), None, tmp_path / "magnitude",
                                          method="magnitude", pattern="2:4",
                                          log=lambda *_: None))
    unseen = [key for key in reference if ".experts.2." in key or ".experts.3." in key]
    seen = [key for key in reference if ".experts.0." in key or ".experts.1." in key]
    assert len(unseen) == len(seen) == 12
    runs = dict(wanda={}, sparsegpt={}, copal={}, **{"copal-obs": dict(
        options=CopalOptions(weight_update="obs"))})
    warning = (r"block 0: no calibration token was routed to 6 expert layer\(s\) \("
               r"(block_sparse_moe|mlp).experts.2.w1")
    for name, options in runs.items():
        with pytest.warns(UserWarning, match=warning):
            out = prune_checkpoint(str(source), str(corpus), tmp_path / name,
                                   method=name.split("-")[0], pattern="2:4",
                                   log=lambda *_: None, **options, **WINDOWS)
        if name.startswith("copal"):
            with pytest.warns(UserWarning, match=warning):
                out = continue_checkpoint(str(out / "copal-state.safetensors"), str(corpus_b),
                                          tmp_path / f"{name}-2", log=lambda *_: None)
        written = _tensors(out)
        for key in unseen:
            assert torch.equal(written[key], reference[key]), (name, key)
        assert any(not torch.equal(written[key] != 0, reference[key] != 0) for key in seen), name


def test_in_memory_mixture_saves_as_transformers_does(tmp_path):
    """ContinualPruner on an in-memory Mixtral (transformers 5: stacked experts, unstacked in
    place with shared storage): the pruned model runs, ``save_pretrained`` writes the
    per-expert layout, and the reloaded model computes the same logits."""
    model = tiny_model("mixtral")
    ids = torch.randint(0, 90, (2, 16))
    pruner = ContinualPruner(model, method="wanda", pattern="2:4", batch_size=2)
    pruner.step(torch.randint(0, model.config.vocab_size, (4, 32),
                              generator=torch.Generator().manual_seed(0)))
    experts = [m.weight for name, m in model.named_modules()
               if ".experts." in name and isinstance(m, torch.nn.Linear)]
    assert len(experts) == 24
    for weight in experts:
        check_pattern(weight, "2:4", "expert")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_stacked_experts_of_an_unknown_layout_are_refused():
    """Transformers 5's stacked experts with biases or transposed weights (gpt-oss's layout):
    refused before any work, not pruned as if they were Mixtral's."""
    model = tiny_model("mixtral")
    layer = model.model.layers[0]
    if not hasattr(layer, "mlp"):
        pytest.skip("transformers 4 builds the experts as nn.Linear")
    experts = layer.mlp.experts
    experts.is_transposed = True
    with pytest.raises(UnsupportedModelError, match="stacked experts of a layout this version "
                                                    "does not know"):
        LayeredModel.from_model(model)


def test_layer_names_are_the_checkpoints_in_every_transformers_version():
    """Mixtral's layers are ``block_sparse_moe.*`` as on disk (transformers 5 calls the module
    ``mlp``), so states and reports agree across versions; the router is not a layer; each
    expert's up projection shares its gate projection's Gram matrix, by structure."""
    lm = LayeredModel.from_model(tiny_model("mixtral"))
    block = lm.blocks[0]
    experts = {f"block_sparse_moe.experts.{e}.{p}" for e in range(4) for p in ("w1", "w2", "w3")}
    assert set(lm.linears(block)) == experts | {f"self_attn.{p}_proj" for p in "qkvo"}
    assert lm.routers(block) == {"block_sparse_moe.gate"}
    assert lm.expert_layers(block) == {name: name[:-1] + "1" if name.endswith("w3") else None
                                       for name in experts}


def test_copal_with_tokens_but_no_gradient_prunes_by_magnitude():
    """The gradient pass runs the dense model, which may route a token elsewhere than the pruned
    model: a layer with calibration tokens and a zero gradient has no non-zero term, so its mask
    is magnitude's, not one of ties."""
    from copal.methods import Copal, LayerStats, Magnitude, Pattern

    torch.manual_seed(0)
    linear, reference = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)
    reference.weight.data.copy_(linear.weight.data)
    stats = LayerStats(linear, gram=False)
    stats.add(torch.randn(5, 16))
    method = Copal({}, {"0.expert": torch.zeros(8)}, CopalOptions(gradient="lm"))
    method.prune_block(0, {"expert": linear}, {"expert": stats}, Pattern.parse("2:4"))
    Magnitude().prune_block(0, {"expert": reference}, {}, Pattern.parse("2:4"))
    assert torch.equal(linear.weight, reference.weight)
