"""Inputs shared by the tests: fresh random data, heavy ties, the devices to test on."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_weight(rows: int, cols: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """``random``: Gaussian; ``ties``: rounded to 7 levels as in 4-bit-dequantised weights;
    ``flat``: a handful of values only, so whole groups and rows tie."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    if kind == "ties":
        weight = (weight * 2).round().clamp(-3, 3) / 2
    elif kind == "flat":
        weight = torch.randint(-1, 2, (rows, cols), generator=gen).float() * 0.5
    return weight.to(dtype).to(DEVICE)


def make_norms(steps: int, length: int, seed: int, kind: str = "random") -> torch.Tensor:
    """Non-negative fp32 [steps, length] norm vectors; ``ties`` makes them few-valued."""
    gen = torch.Generator().manual_seed(seed)
    norms = torch.rand(steps, length, generator=gen) + 0.05
    if kind in ("ties", "flat"):
        norms = (norms * 4).round() / 4 + 0.25
    return norms.to(DEVICE)


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    reference, output = reference.double(), output.double()
    return float((reference - output).norm() / reference.norm().clamp_min(1e-30))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (fp32): unlike torch.equal, tells -0.0 from +0.0 and NaN payloads."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32),
                                              b.contiguous().view(torch.int32))
