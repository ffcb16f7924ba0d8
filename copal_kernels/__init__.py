"""copal_kernels: fused Triton kernels for importance scores, N:M / unstructured masks and
SparseGPT's OBS block loop.

Every op has a pure-torch reference in :mod:`copal_kernels.naive`; the public functions run the
Triton kernels on CUDA tensors (or under ``TRITON_INTERPRET=1``) and the reference otherwise, with
bit-identical results. Masks are bool with True = keep, except in the drop-ins that keep their
callers' convention (True = pruned): :func:`wanda_mask`, :func:`obs_block_` and the SparseGPT
ones (:mod:`copal_kernels.sparsegpt`).
"""

from . import naive
from ._validate import AGGREGATIONS, check_importance_inputs
from .nm import nm_mask, nm_prune_
from .obs import OBSBlock, obs_block_
from .sparsegpt import sparsegpt_block, sparsegpt_block_mask, sparsegpt_prune_
from .stats import channel_sumsq_
from .unstructured import unstructured_mask, unstructured_prune_
from .wanda import wanda_mask


def importance(weight, grad_norms=None, act_norms=None, *, aggregation="sum", step_weights=None):
    """The fused importance materialised, fp32 ``[out, in]`` (the torch reference; for analysis,
    the kernels never write it). Arguments as in :func:`nm_mask`."""
    grads, acts, lambdas, _ = check_importance_inputs(
        weight, grad_norms, act_norms, aggregation, step_weights
    )
    return naive.importance(weight, grads, acts, aggregation, lambdas)


__all__ = [
    "AGGREGATIONS",
    "channel_sumsq_",
    "importance",
    "naive",
    "nm_mask",
    "nm_prune_",
    "sparsegpt_block",
    "sparsegpt_block_mask",
    "sparsegpt_prune_",
    "OBSBlock",
    "obs_block_",
    "unstructured_mask",
    "unstructured_prune_",
    "wanda_mask",
]
__version__ = "0.1.0"
