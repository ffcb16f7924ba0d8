"""Tests run the Triton kernels on CUDA when a GPU is present, else on the CPU under Triton's
interpreter, which must be switched on before any kernel is defined."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
