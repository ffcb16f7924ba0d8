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
from ._importance import importance_meta, importance_tile, non_finite, score_keys
from ._validate import check_importance_inputs, check_nm, non_finite_error


@triton.jit
def _nm_kernel(
    w_ptr,
    mask_ptr,
    flag_ptr,
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
    CHECK_FINITE: tl.constexpr,
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
    keys = score_keys(score, ok)  # padding lanes never rank below a weight

    # rank = how many group members a stable ascending sort puts before this weight
    rank = tl.zeros([BLOCK_R, BLOCK_G, M_POW2], dtype=tl.int32)
    for k in tl.static_range(M):
        key_k = tl.max(tl.where(lanes == k, keys, -1), axis=2)[:, :, None]
        before = (key_k < keys) | ((key_k == keys) & (k < lanes))
        rank += before.to(tl.int32)
    keep = rank >= (M - N)
    if CHECK_FINITE:  # a group holding a NaN/Inf score is left as it is, and the flag is raised
        group_bad = tl.max(non_finite(keys), axis=2)
        keep = keep | (group_bad[:, :, None] > 0)
        tl.atomic_max(flag_ptr, tl.max(tl.max(group_bad, axis=1), axis=0))

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
        weight, grad_norms, act_norms, aggregation, step_weights
    )
    check_nm(weight.shape[1], n, m)
    left = "; the N:M groups holding them were left as they were" if write_weight else ""
    if not use_triton(weight):
        score = naive.importance(weight, grads, acts, aggregation, lambdas)
        keep = naive.nm_mask(score, n, m)
        bad = naive.non_finite_units(score, m) if check_finite else None
        if bad is not None:
            keep |= bad
        if write_weight:
            weight.masked_fill_(~keep, 0)
        if bad is not None:
            raise non_finite_error(weight, left)
        return keep if write_mask else None

    n_rows, n_cols = weight.shape
    n_groups = n_cols // m
    m_pow2 = triton.next_power_of_2(m)
    keep = torch.empty((n_rows, n_cols), dtype=torch.bool, device=weight.device) if write_mask else None
    flag = torch.zeros(1, dtype=torch.int32, device=weight.device) if check_finite else weight
    block_r, block_g, num_warps = _tile(n_rows, n_groups, m_pow2)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_groups, block_g))
    _nm_kernel[grid](
        weight, keep.view(torch.uint8) if write_mask else weight, flag,
        n_rows=n_rows, n_cols=n_cols, n_groups=n_groups,
        stride_wr=weight.stride(0), stride_wc=weight.stride(1),
        N=n, M=m, M_POW2=m_pow2, BLOCK_R=block_r, BLOCK_G=block_g,
        WRITE_MASK=write_mask, WRITE_WEIGHT=write_weight, CHECK_FINITE=check_finite,
        num_warps=num_warps, enable_fp_fusion=False,
        **importance_meta(grads, acts, lambdas, steps, aggregation, weight),
    )
    if check_finite and flag.item():  # the call's one host synchronisation
        raise non_finite_error(weight, left)
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
        check_finite: raise ``ValueError`` if an importance score is NaN or Inf: a NaN/Inf
            weight, or finite inputs whose score overflows fp32. Checked in the same pass (a
            flag read once, the call's one host synchronisation). With ``False``, such scores
            are ranked as a stable ``torch.sort`` ranks them (NaN above +Inf above every finite
            score), so the counts stay exact.

    Returns:
        bool ``[out, in]``, True = keep. Ties: the lower column is pruned first.

    Raises:
        TypeError, ValueError: bad types, shapes, devices (meta included), patterns or values,
        before any work; ValueError for non-finite scores (see ``check_finite``).
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
    validated before anything is written. With ``check_finite``, an N:M group holding a NaN/Inf
    score is left as it was and every other group is pruned before the ``ValueError``.
    """
    return _nm(weight, grad_norms, act_norms, n, m, aggregation, step_weights, return_mask, True,
               check_finite)
