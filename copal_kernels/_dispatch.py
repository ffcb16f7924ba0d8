"""Choose between the Triton kernels and the torch references.

The Triton path runs for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` was set
before Triton was imported (Triton's interpreter, used by the tests). Everything else runs the
torch reference in :mod:`copal_kernels.naive`, which gives bit-identical masks.
"""

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # Triton ships for Linux only
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` should go through the Triton kernels."""
    if not HAS_TRITON:
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())
