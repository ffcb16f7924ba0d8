"""Synthetic checkpoints of real LLaMA shapes, for speed and memory measurements only.

:class:`SyntheticReader` serves seeded random weights block by block through the same interface
as :class:`copal.checkpoint.ShardReader` (``weight_map`` and ``read``), host-resident (pinned
when a GPU is there) like a checkpoint read from disk, so host-to-device transfers are real. The
whole model never exists: the reader holds ``distinct_blocks`` seeded blocks and serves block i
as block ``i % distinct_blocks`` (a 65B block is 1.6 GB in bf16; 80 of them are 130 GB).

Every number measured on these weights is about **speed and memory, never quality**: the weights
are random (std 0.02, norms 1), so perplexities and masks mean nothing.
"""

from typing import Dict, Iterable, Optional

import torch
from transformers import LlamaConfig

from .model import LayeredModel

SYNTHETIC_LABEL = "synthetic weights (random, seeded): speed and memory only, never quality"

# name: (hidden, intermediate, blocks, heads, kv heads, vocab)
SHAPES = {
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama-30b": (6656, 17920, 60, 52, 52, 32000),
    "llama-65b": (8192, 22016, 80, 64, 64, 32000),
    "llama2-70b": (8192, 28672, 80, 64, 8, 32000),
    "tiny": (256, 688, 8, 4, 2, 1024),  # CPU tests and smoke runs
}


def synthetic_config(shape: str, num_blocks: Optional[int] = None) -> LlamaConfig:
    """The ``LlamaConfig`` of a named shape, optionally with fewer blocks (per-block timings)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}; choose from {', '.join(SHAPES)}")
    hidden, intermediate, blocks, heads, kv_heads, vocab = SHAPES[shape]
    if num_blocks is not None and not 1 <= num_blocks <= blocks:
        raise ValueError(f"{shape} has {blocks} blocks, cannot take {num_blocks}")
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=num_blocks or blocks, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


def _tensor_shapes(config: LlamaConfig) -> Dict[str, tuple]:
    """Checkpoint key -> shape, as ``LlamaForCausalLM`` names its tensors."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    block = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
             "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
             "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
             "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,),
             "post_attention_layernorm.weight": (h,)}
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (config.vocab_size, h)}
    for b in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{b}.{name}": shape for name, shape in block.items()})
    return shapes


class SyntheticReader:
    """Seeded random tensors by checkpoint key; blocks repeat every ``distinct_blocks``.

    ``read`` returns the reader's own host tensors (``shares_tensors``): whoever loads them onto
    the host device must copy before writing (:meth:`LayeredModel.load_block` does).
    """

    shares_tensors = True

    def __init__(self, config: LlamaConfig, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 distinct_blocks: int = 2, pin: Optional[bool] = None):
        self.config = config
        self.seed = seed
        self.dtype = dtype
        self.distinct_blocks = max(1, min(distinct_blocks, config.num_hidden_layers))
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.shapes = _tensor_shapes(config)
        self.weight_map = {key: "synthetic" for key in self.shapes}
        self._key_seed = {key: n for n, key in enumerate(sorted(self.shapes))}
        self._made: Dict[str, torch.Tensor] = {}

    def _canonical(self, key: str) -> str:
        parts = key.split(".")
        if key.startswith("model.layers."):
            parts[2] = str(int(parts[2]) % self.distinct_blocks)
        return ".".join(parts)

    def _make(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        if len(shape) == 1:  # norm weights
            tensor = torch.ones(shape, dtype=self.dtype)
        else:
            # drawn on the GPU when there is one (a 65B block is 0.8G numbers), kept on the host
            device = "cuda" if torch.cuda.is_available() else "cpu"
            generator = torch.Generator(device).manual_seed(self.seed * 1_000_003 + self._key_seed[key])
            tensor = torch.empty(shape, dtype=self.dtype)
            for row in range(0, shape[0], 1024):  # fp32 scratch stays small
                rows = torch.randn((min(1024, shape[0] - row), shape[1]), generator=generator,
                                   device=device)
                tensor[row:row + rows.shape[0]] = rows.mul_(0.02).to(self.dtype).cpu()
        return tensor.pin_memory() if self.pin else tensor

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        out = {}
        for name in names:
            if name not in self.shapes:
                raise KeyError(f"synthetic model has no tensor {name!r}")
            canonical = self._canonical(name)
            if canonical not in self._made:
                self._made[canonical] = self._make(canonical)
            out[name] = self._made[canonical]
        return out

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._made.values())


def synthetic_model(shape: str, *, num_blocks: Optional[int] = None, dtype=torch.bfloat16,
                    seed: int = 0, distinct_blocks: int = 2, pin: Optional[bool] = None) -> LayeredModel:
    """A lazy :class:`LayeredModel` of a named shape over a :class:`SyntheticReader`."""
    config = synthetic_config(shape, num_blocks)
    reader = SyntheticReader(config, seed=seed, dtype=dtype, distinct_blocks=distinct_blocks, pin=pin)
    return LayeredModel.from_reader(config, reader, dtype, source=f"synthetic:{shape}")
