"""Block-by-block forward equals the model's own forward, for every supported architecture,
in memory and streamed from a checkpoint on disk."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from copal.checkpoint import CheckpointError
from copal.model import LayeredModel, UnsupportedModelError

from .tiny import ARCHITECTURES, MIXTURES, SLIDING, tiny_model


def _blockwise_logits(lm, ids):
    hidden = lm.embed_tokens(ids)
    context = lm.block_context(hidden)
    for index in range(lm.num_blocks):
        hidden = lm.run_block(lm.load_block(index, "cpu"), hidden, context)
        lm.unload_block(index)
    return lm.logits(hidden)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES) + [f"{a}+sliding" for a in SLIDING])
def test_blockwise_forward_equals_full_forward(arch, attn, tmp_path):
    """Every architecture with what its config switches on (Granite's multipliers, Qwen3's and
    OLMo2's q/k norms, Phi-3's fused projections; sliding windows of 8 on windows of 24, on every
    layer or per ``layer_types``): the model's own attention masks and scalings."""
    arch, _, sliding = arch.partition("+")
    model = tiny_model(arch, attn=attn, tied=arch == "llama", sliding=bool(sliding))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = model(ids).logits
        lm = LayeredModel.from_model(model)
        # transformers 5's stacked experts, unstacked in place (copal.experts): the same
        # function, its gate and up projections as two matmuls instead of one
        own = model(ids).logits
        in_memory = _blockwise_logits(lm, ids)
        model.save_pretrained(tmp_path)
        lazy = LayeredModel.from_checkpoint(tmp_path, dtype=torch.float32)
        streamed = _blockwise_logits(lazy, ids)
    torch.testing.assert_close(own, expected, rtol=0 if arch not in MIXTURES else 1e-6,
                               atol=0 if arch not in MIXTURES else 1e-6)
    torch.testing.assert_close(in_memory, own, rtol=0, atol=0)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)
    assert all(p.is_meta for p in lazy.blocks.parameters()), "finished blocks are released"


def test_unsupported_architecture(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        LayeredModel.from_model(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LayeredModel.from_checkpoint(tmp_path)


def test_other_mixtures_of_experts_are_refused_clearly():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    model = OlmoeForCausalLM(OlmoeConfig(vocab_size=64, hidden_size=16, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, num_experts=4))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'olmoe'; "
                                                    "supported: .*mixtral, qwen2_moe, qwen3_moe"):
        LayeredModel.from_model(model)


def test_missing_and_corrupt_shards(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    shards = sorted(broken.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        LayeredModel.from_checkpoint(broken)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoint, corrupt)
    shard = sorted(corrupt.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(CheckpointError, match="unreadable shard"):
        LayeredModel.from_checkpoint(corrupt).load_block(0, "cpu")
    with pytest.raises(CheckpointError, match="no config.json"):
        LayeredModel.from_checkpoint(tmp_path)
