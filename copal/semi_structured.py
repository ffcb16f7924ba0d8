"""A pruned checkpoint that says it is sparse, and a 2:4 one that runs on sparse tensor cores.

The mark (:func:`sparsity_config`): the written ``config.json`` gets ``sparsity_config`` with the
fields of compressed-tensors' dense sparsity config (``format: "dense"``, ``sparsity_structure``,
``global_sparsity``, ``targets``, ``ignore``), so tools that read it can tell a pruned checkpoint
from a dense one, and ``copal_pruning`` with what made it (method, pattern, options, datasets,
achieved sparsity per layer type). It is not put under ``quantization_config``, where
compressed-tensors keeps it in its own checkpoints: there transformers would route loading
through its compressed-tensors quantizer and require that package for a checkpoint whose
weights are plain dense tensors.

The loader (:func:`load_semi_structured`): a 2:4 checkpoint on a CUDA GPU (compute capability
8.0 or later) with every pruned Linear's weight turned into
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt where torch has it, else CUTLASS), the
path that remains for users now that vLLM dropped its 2:4 kernels.
"""

import re
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .experts import prunable_linears, unstack_experts

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def sparsity_config(structure: str, zeros: Dict[str, int], totals: Dict[str, int],
                    provenance: dict, routers=()) -> dict:
    """The config.json entries of a pruned checkpoint: ``sparsity_config`` (compressed-tensors'
    field names) and ``copal_pruning``. ``structure``: ``"2:4"``, ``"4:8"`` or
    ``"unstructured"``; ``zeros``/``totals``: zero and all weights per layer type (the name of a
    Linear inside a block, ``mlp.down_proj``) over the pruned Linears; ``routers``: the names
    inside a block of mixture-of-experts routers (left dense, so in ``ignore``)."""
    by_type = {name: zeros[name] / totals[name] for name in sorted(totals) if totals[name]}
    overall = sum(zeros.values()) / max(sum(totals.values()), 1)
    return {
        "sparsity_config": {"format": "dense", "sparsity_structure": structure,
                            "global_sparsity": overall, "targets": ["Linear"],
                            # a router by its own name, which transformers 4 and 5 share
                            # (Mixtral's sits in ``block_sparse_moe`` in 4.x, ``mlp`` in 5.x)
                            "ignore": ["lm_head"] + [f"re:.*\\.{re.escape(name)}$" for name in
                                                     sorted({r.rpartition(".")[2] for r in routers})],
                            "registry_requires_subclass": False},
        "copal_pruning": {
            "layers": "every nn.Linear inside a decoder block but a mixture-of-experts router "
                      "(not the embeddings nor the head)",
            "sparsity_by_layer_type": by_type,
            **{key: provenance.get(key) for key in ("verb", "method", "pattern", "options",
                                                    "datasets", "windows")}},
    }


def is_exact_2of4(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive input columns of ``weight`` [out, in] holds at most 2
    non-zeros (``in`` a multiple of 4)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def to_semi_structured_(model: nn.Module, blocks: nn.ModuleList) -> Dict[str, str]:
    """Turn every ``nn.Linear`` inside ``blocks`` (the decoder layers of ``model``, on a CUDA
    device, fp16 or bf16) into a semi-structured sparse weight, in place.

    Returns {layer name: "semi-structured" or why it stays dense (a shape the sparse kernels do
    not take)}. Raises ValueError naming the first Linear that is not exactly 2:4.
    Mixture-of-experts routers stay dense; transformers 5's stacked experts are first unstacked
    into one Linear per expert projection (copal.experts)."""
    unstack_experts(model, blocks)
    report = {}
    for index, block in enumerate(blocks):
        for name, linear in prunable_linears(block).items():
            label = f"layers.{index}.{name}"
            weight = linear.weight.detach()
            if not is_exact_2of4(weight):
                raise ValueError(f"{label}: its weight is not 2:4 (a group of 4 input columns "
                                 "holds more than 2 non-zeros); prune with --pattern 2:4")
            try:
                sparse = torch.sparse.to_sparse_semi_structured(weight.contiguous())
            except RuntimeError as error:  # shapes the kernels do not take stay dense
                report[label] = f"dense ({' '.join(str(error).split())[:160]})"
                continue
            linear.weight = nn.Parameter(sparse, requires_grad=False)
            report[label] = "semi-structured"
    return report


def check_device(device, dtype) -> torch.device:
    """ValueError unless ``device`` is a CUDA GPU of compute capability 8.0+ and ``dtype`` is
    fp16 or bf16 (before any work)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"semi-structured (2:4) sparse weights run on a CUDA GPU of compute "
                         f"capability 8.0 or later (torch.sparse.to_sparse_semi_structured); "
                         f"got device {device}" + ("" if torch.cuda.is_available() else
                                                   ", and this machine has no CUDA GPU"))
    if torch.cuda.get_device_capability(device)[0] < 8:
        raise ValueError(f"{torch.cuda.get_device_name(device)} has compute capability "
                         f"{torch.cuda.get_device_capability(device)}; 2:4 sparse tensor cores "
                         "need 8.0 or later")
    if dtype not in SPARSE_DTYPES:
        raise ValueError(f"semi-structured weights of a float model: float16 or bfloat16, got "
                         f"{dtype}")
    return device


def load_semi_structured(path, *, device="cuda", dtype: torch.dtype = torch.bfloat16,
                         report: Optional[dict] = None):
    """A 2:4-pruned checkpoint as a transformers model on ``device`` whose decoder Linears hold
    semi-structured sparse weights (:func:`to_semi_structured_`), in eval mode.

    path: a checkpoint directory written by ``copal prune --pattern 2:4`` (or any checkpoint
    whose decoder Linears are exactly 2:4). ``report``: a dict filled with each Linear's
    outcome. Raises ValueError (device, dtype, a config that marks another pattern, a weight
    that is not 2:4) before the model is converted."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = check_device(device, dtype)
    config = AutoConfig.from_pretrained(path)
    marked = (getattr(config, "sparsity_config", None) or {}).get("sparsity_structure")
    if marked is not None and marked != "2:4":
        raise ValueError(f"{Path(path) / 'config.json'} marks {marked} sparsity, not 2:4")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    outcome = to_semi_structured_(model, model.model.layers)
    if report is not None:
        report.update(outcome)
    return model
