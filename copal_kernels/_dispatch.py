"""Choose between the Triton kernels and the torch references.

The Triton path runs for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` was set
before Triton was imported (Triton's interpreter, used by the tests). Everything else runs the
torch reference in :mod:`copal_kernels.naive`, which gives bit-identical masks.
"""

import os

import torch

from ._triton import HAS_TRITON
from ._validate import non_finite_error


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` should go through the Triton kernels."""
    if not HAS_TRITON:
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())


def reference_result(weight: torch.Tensor, keep: torch.Tensor, bad, write_mask: bool,
                     write_weight: bool, left: str):
    """The end of a prune on the torch path, under the kernels' rule: the units holding a
    NaN/Inf score (``bad``, bool like ``keep``, or None) are kept as they are, the rest is
    pruned (in place if ``write_weight``), then ``ValueError`` (``left`` says what was written);
    else the keep-mask if ``write_mask``."""
    if bad is not None:
        keep |= bad
    if write_weight:
        weight.masked_fill_(~keep, 0)
    if bad is not None:
        raise non_finite_error(weight, left)
    return keep if write_mask else None
