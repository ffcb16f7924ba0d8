"""Channel statistics: the fp32 sum of squares of every feature, accumulated in place.

Serves activation norms (inputs of a Linear, ``sum_n x[n, j]^2``) and gradient norms (gradients of
its output, ``sum_n d[n, i]^2``). Each program sums a slice of rows for ``BLOCK_C`` features into
a partial row; the partial rows are then added in a fixed order, so results are deterministic
(no atomics).
"""

import torch

from . import naive
from ._dispatch import interpreting, use_triton
from ._triton import tl, triton
from ._validate import FLOAT_DTYPES, check_data


@triton.jit
def _channel_sumsq_kernel(
    x_ptr, partial_ptr, n_rows, n_cols, stride_r, stride_c, rows_per_split,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=ok, other=0.0)
        x = x.to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + pid_s * n_cols + cols, tl.sum(acc, axis=0), mask=col_ok)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x[..., C]`` as a 2-D [rows, C] view when the leading dims allow it, else a copy."""
    if x.dim() == 2:
        return x
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def channel_sumsq_(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Add the sum of squares of every feature of ``x`` to ``acc``, in place.

    Args:
        acc: fp32 ``[C]`` contiguous accumulator, **mutated**: ``acc[c] += sum(x[..., c] ** 2)``.
        x: ``[..., C]`` fp32/fp16/bf16, any strides (2-D strides are read as they are; leading
            dims that cannot be merged into one are copied first). Squares are summed in fp32.

    Returns:
        ``acc``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape [..., C]")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if acc.dtype != torch.float32 or acc.dim() != 1 or not acc.is_contiguous():
        raise TypeError(f"acc must be a contiguous fp32 [C] tensor, got {acc.dtype} {tuple(acc.shape)}")
    if acc.shape[0] != x.shape[-1]:
        raise ValueError(f"acc has {acc.shape[0]} channels but x has {x.shape[-1]}")
    if acc.device != x.device:
        raise ValueError(f"acc is on {acc.device} but x is on {x.device}")
    check_data(x, "x")
    if x.numel() == 0:
        return acc
    if not use_triton(x):
        return acc.add_(naive.channel_sumsq(x))

    rows = _as_rows(x)
    n_rows, n_cols = rows.shape
    block_c = min(triton.next_power_of_2(n_cols), 128 if interpreting() else 64)
    block_r = min(triton.next_power_of_2(n_rows), 256 if interpreting() else 32)
    col_blocks = triton.cdiv(n_cols, block_c)
    # enough programs to fill a GPU (about 1024), never fewer than one block of rows each
    target_splits = 1 if interpreting() else max(1, 1024 // col_blocks)
    rows_per_split = max(block_r, triton.cdiv(triton.cdiv(n_rows, target_splits), block_r) * block_r)
    splits = triton.cdiv(n_rows, rows_per_split)
    partial = torch.empty((splits, n_cols), dtype=torch.float32, device=x.device)
    _channel_sumsq_kernel[(col_blocks, splits)](
        rows, partial, n_rows, n_cols, rows.stride(0), rows.stride(1), rows_per_split,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return acc.add_(partial.sum(dim=0))
