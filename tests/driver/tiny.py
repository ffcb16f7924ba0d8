"""Tiny random models of each supported architecture, a word-level tokenizer and a small text
corpus, all made offline, for the driver's tests."""

import random
from pathlib import Path

import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
}
MIXTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
# what each architecture switches on beyond a plain LLaMA, set to values that change the output
EXTRA = {
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3,
                    logits_scaling=4.0),
    "phi3": dict(pad_token_id=0),
    # Gemma: embeddings scaled by sqrt(hidden), attention and final logits soft-capped (Gemma 2),
    # q/k norms and two rotary bases (Gemma 3), local (sliding) and global layers alternating
    "gemma2": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=8, pad_token_id=0,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gemma3": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=8, pad_token_id=0,
                   layer_types=["sliding_attention", "full_attention"],
                   rope_local_base_freq=100.0),
    # 4 experts, 2 per token; Qwen2-MoE's shared expert and its gate; Qwen's dense MLP on the
    # layers of mlp_only_layers
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=32, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      norm_topk_prob=True),
}
# sliding-window attention shorter than the test windows: Mistral's on every layer, Qwen2's and
# Qwen3's per layer (layer_types) from max_window_layers on
SLIDING = {
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
}
WORDS = ("the of and to in is was for on as with by at from his her an were which are this "
         "that be or had not but all one their also has its have after first new two who "
         "they been more other into some time only most over there can these such may king "
         "lord said unto god hacker program system file user code bug feature").split()


def tiny_model(arch: str = "llama", *, vocab: int = 96, hidden: int = 32, layers: int = 2,
               intermediate: int = 48, attn: str = "sdpa", seed: int = 0, tied: bool = True,
               sliding: bool = False, **overrides):
    """``overrides``: config fields set last (``num_local_experts=16``)."""
    config_cls, model_cls = ARCHITECTURES[arch]
    if arch == "gemma2":  # soft-capped attention has no sdpa path in transformers
        attn = "eager"
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, tie_word_embeddings=tied,
                        attn_implementation=attn, **{**EXTRA.get(arch, {}),
                                                     **(SLIDING[arch] if sliding else {}),
                                                     **overrides})
    torch.manual_seed(seed)
    return model_cls(config).eval()


def write_corpus(path: Path, words: int = 6000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".")
    path.write_text(" ".join(sentences))
    return path


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, ".": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= vocab_size
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def tiny_checkpoint(directory: Path, arch: str = "llama", **kwargs) -> Path:
    model = tiny_model(arch, **kwargs)
    model.save_pretrained(directory, max_shard_size="20KB")
    word_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory
