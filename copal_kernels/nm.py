"""Fused importance + N:M mask: keep N of every M consecutive weights along ``in``.

One program owns a tile of ``BLOCK_R`` rows x ``BLOCK_G`` groups of M columns, forms the importance
in registers (no score matrix is written), ranks every weight inside its group with a stable
ascending order and writes the mask and/or zeroes the pruned weights in place.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import naive
from ._dispatch import interpreting, use_triton
from ._importance import importance_meta, importance_tile
from ._validate import check_importance_inputs, check_nm


@triton.jit
def _nm_kernel(
    w_ptr,
    mask_ptr,
    grad_ptr,
    act_ptr,
    lam_ptr,
    n_rows,
    n_cols,
    n_groups,
    stride_wr,
    stride_wc,
    NUM_STEPS: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr,
    AGGREGATION: tl.constexpr,
    N: tl.constexpr,
    M: tl.constexpr,
    M_POW2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    WRITE_WEIGHT: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None, None]
    groups = (pid_g * BLOCK_G + tl.arange(0, BLOCK_G))[None, :, None]
    lanes = tl.arange(0, M_POW2)[None, None, :]
    cols = groups * M + lanes
    row_ok = rows < n_rows
    col_ok = (lanes < M) & (groups < n_groups)
    ok = row_ok & col_ok

    w_ptrs = w_ptr + rows * stride_wr + cols * stride_wc
    w = tl.load(w_ptrs, mask=ok, other=0.0)
    score = importance_tile(
        tl.abs(w.to(tl.float32)), rows, cols, row_ok, col_ok, grad_ptr, act_ptr, lam_ptr,
        n_rows, n_cols, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
    )
    score = tl.where(lanes < M, score, float("inf"))  # padding lanes never rank below a weight

    # rank = how many group members a stable ascending sort puts before this weight
    rank = tl.zeros([BLOCK_R, BLOCK_G, M_POW2], dtype=tl.int32)
    for k in tl.static_range(M):
        score_k = tl.max(tl.where(lanes == k, score, float("-inf")), axis=2)[:, :, None]
        before = (score_k < score) | ((score_k == score) & (k < lanes))
        rank += before.to(tl.int32)
    keep = rank >= (M - N)

    if WRITE_MASK:
        tl.store(mask_ptr + rows * n_cols + cols, keep.to(tl.uint8), mask=ok)
    if WRITE_WEIGHT:
        tl.store(w_ptrs, tl.where(keep, w, tl.zeros_like(w)), mask=ok)


def _tile(n_rows: int, n_groups: int, m_pow2: int):
    """(BLOCK_R, BLOCK_G, num_warps): ~4K elements a program on a GPU, bigger under the
    interpreter, whose cost is per program."""
    elements = 16384 if interpreting() else 4096
    block_g = min(triton.next_power_of_2(n_groups), 256 // m_pow2)
    block_r = max(1, min(triton.next_power_of_2(n_rows), elements // (block_g * m_pow2)))
    return block_r, block_g, 4


def _nm(weight, grad_norms, act_norms, n, m, aggregation, step_weights, write_mask, write_weight,
        check_finite):
    grads, acts, lambdas, steps = check_importance_inputs(
        weight, grad_norms, act_norms, aggregation, step_weights, check_finite
    )
    check_nm(weight.shape[1], n, m)
    if not use_triton(weight):
        keep = naive.nm_mask(naive.importance(weight, grads, acts, aggregation, lambdas), n, m)
        if write_weight:
            weight.masked_fill_(~keep, 0)
        return keep if write_mask else None

    n_rows, n_cols = weight.shape
    n_groups = n_cols // m
    m_pow2 = triton.next_power_of_2(m)
    keep = torch.empty((n_rows, n_cols), dtype=torch.bool, device=weight.device) if write_mask else None
    block_r, block_g, num_warps = _tile(n_rows, n_groups, m_pow2)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_groups, block_g))
    _nm_kernel[grid](
        weight, keep.view(torch.uint8) if write_mask else weight,
        n_rows=n_rows, n_cols=n_cols, n_groups=n_groups,
        stride_wr=weight.stride(0), stride_wc=weight.stride(1),
        N=n, M=m, M_POW2=m_pow2, BLOCK_R=block_r, BLOCK_G=block_g,
        WRITE_MASK=write_mask, WRITE_WEIGHT=write_weight,
        num_warps=num_warps, enable_fp_fusion=False,
        **importance_meta(grads, acts, lambdas, steps, aggregation, weight),
    )
    return keep


def nm_mask(
    weight: torch.Tensor,
    grad_norms: Optional[torch.Tensor] = None,
    act_norms: Optional[torch.Tensor] = None,
    *,
    n: int,
    m: int,
    aggregation: str = "sum",
    step_weights: Optional[torch.Tensor] = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """N:M mask of the fused importance; nothing is mutated.

    Args:
        weight: ``W[out, in]``, fp32/fp16/bf16, any strides. ``in % m == 0``.
        grad_norms: ``G[T, out]`` (or ``[out]`` for T = 1), non-negative, or None (a factor of 1).
        act_norms: ``A[T, in]`` (or ``[in]``), non-negative, or None (a factor of 1).
            Both None gives magnitude (T = 0); ``G=None, A=sqrt(scaler_row)`` gives Wanda.
        n, m: keep ``n`` of every ``m`` consecutive weights along ``in`` (**n counts kept
            weights**; Wanda's ``prune_n`` is ``m - n``). ``1 <= n < m <= 32``.
        aggregation: ``"sum"``, ``"max"`` or ``"sumsq"`` (sum of squared terms) over steps,
            see :func:`copal_kernels.naive.importance`. step_weights: ``lambda[T]`` or None.
        check_finite: reject NaN/Inf in ``weight`` (one extra read of it).

    Returns:
        bool ``[out, in]``, True = keep. Ties: the lower column is pruned first.
    """
    return _nm(weight, grad_norms, act_norms, n, m, aggregation, step_weights, True, False,
               check_finite)


def nm_prune_(
    weight: torch.Tensor,
    grad_norms: Optional[torch.Tensor] = None,
    act_norms: Optional[torch.Tensor] = None,
    *,
    n: int,
    m: int,
    aggregation: str = "sum",
    step_weights: Optional[torch.Tensor] = None,
    return_mask: bool = False,
    check_finite: bool = True,
) -> Optional[torch.Tensor]:
    """Like :func:`nm_mask`, but zeroes the pruned weights of ``weight`` **in place**.

    Returns the bool keep-mask ``[out, in]`` if ``return_mask`` else None. The inputs are fully
    validated before anything is written.
    """
    return _nm(weight, grad_norms, act_norms, n, m, aggregation, step_weights, return_mask, True,
               check_finite)
