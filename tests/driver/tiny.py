"""Tiny random models of each supported architecture, a word-level tokenizer and a small text
corpus, all made offline, for the driver's tests."""

import random
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
WORDS = ("the of and to in is was for on as with by at from his her an were which are this "
         "that be or had not but all one their also has its have after first new two who "
         "they been more other into some time only most over there can these such may king "
         "lord said unto god hacker program system file user code bug feature").split()


def tiny_model(arch: str = "llama", *, vocab: int = 96, hidden: int = 32, layers: int = 2,
               intermediate: int = 48, attn: str = "sdpa", seed: int = 0, tied: bool = True):
    config_cls, model_cls = ARCHITECTURES[arch]
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, tie_word_embeddings=tied,
                        attn_implementation=attn)
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
