"""Fused importance + N:M mask: keep N of every M consecutive weights along ``in``.

One program owns a tile of ``BLOCK_R`` rows x ``BLOCK_G`` groups of M columns, forms the importance
in registers (no score matrix is written), ranks every weight inside its group with a stable
ascending order and writes the mask and/or zeroes the pruned weights in place.

Two ways to rank, one result:
* M = 4 and M = 8 (2:4, 4:8, every N): the tile is loaded as ``[BLOCK_R, BLOCK_G * M]`` contiguous
  columns, and ``tl.reshape`` + ``tl.split`` take it apart into M tiles ``[BLOCK_R, BLOCK_G]``, one
  per position in the group, so each thread holds whole groups: a weight's rank is M - 1
  elementwise comparisons with its group's other members (12 for 2:4, 56 for 4:8), and the keep
  tiles are joined back for one contiguous store;
* any other M up to 32: a ``[BLOCK_R, BLOCK_G, next_pow2(M)]`` tile in which each member is taken
  out by a reduction over the group, M times.
"""

from typing import Optional

import torch

from . import naive
from ._dispatch import interpreting, reference_result, use_triton
from ._importance import importance_meta, load_keys, non_finite
from ._triton import tl, triton
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
    if M == 4 or M == 8:
        _nm_split_tile(
            w_ptr, mask_ptr, flag_ptr, grad_ptr, act_ptr, lam_ptr, n_rows, n_cols, stride_wr,
            stride_wc, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION, N, M, BLOCK_R,
            BLOCK_G, WRITE_MASK, WRITE_WEIGHT, CHECK_FINITE,
        )
    else:
        _nm_reduce_tile(
            w_ptr, mask_ptr, flag_ptr, grad_ptr, act_ptr, lam_ptr, n_rows, n_cols, n_groups,
            stride_wr, stride_wc, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION, N, M,
            M_POW2, BLOCK_R, BLOCK_G, WRITE_MASK, WRITE_WEIGHT, CHECK_FINITE,
        )


@triton.jit
def _before(key_other, key_self, OTHER_IS_LOWER: tl.constexpr):
    """1 where a stable ascending sort puts the other member first (ties: the lower column)."""
    if OTHER_IS_LOWER:
        before = key_other <= key_self
    else:
        before = key_other < key_self
    return before.to(tl.int32)


@triton.jit
def _keep_lane(k0, k1, k2, k3, k4, k5, k6, k7, I: tl.constexpr, N: tl.constexpr,
               M: tl.constexpr):
    """Keep-mask of group member I (keys k0..k{M-1}): its rank among them is at least M - N."""
    keys = (k0, k1, k2, k3, k4, k5, k6, k7)
    rank = tl.zeros(k0.shape, dtype=tl.int32)
    for j in tl.static_range(M):
        if j != I:
            rank += _before(keys[j], keys[I], j < I)
    return rank >= M - N


@triton.jit
def _split_group(x, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, M: tl.constexpr):
    """``[BLOCK_R, BLOCK_G * M]`` -> the M members' ``[BLOCK_R, BLOCK_G]`` tiles (M = 4 or 8;
    for M = 4 the last four are copies of the first and never used)."""
    # one return at the end: Triton 3.6 still compiles what follows an early return
    if M == 4:
        x = tl.reshape(x, [BLOCK_R, BLOCK_G, 2, 2])  # [.., p, q]: column 4g + 2p + q
        even, odd = tl.split(x)  # q = 0: members 0, 2; q = 1: members 1, 3
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        x4, x5, x6, x7 = x0, x1, x2, x3
    else:
        x = tl.reshape(x, [BLOCK_R, BLOCK_G, 2, 2, 2])  # [.., a, b, c]: column 8g + 4a + 2b + c
        c0, c1 = tl.split(x)  # members 4a + 2b and 4a + 2b + 1
        b00, b01 = tl.split(c0)  # members 4a, 4a + 2
        b10, b11 = tl.split(c1)  # members 4a + 1, 4a + 3
        x0, x4 = tl.split(b00)
        x2, x6 = tl.split(b01)
        x1, x5 = tl.split(b10)
        x3, x7 = tl.split(b11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _join_group(x0, x1, x2, x3, x4, x5, x6, x7, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
                M: tl.constexpr):
    """The inverse of :func:`_split_group`: ``[BLOCK_R, BLOCK_G * M]``."""
    if M == 4:
        x = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    else:
        c0 = tl.join(tl.join(x0, x4), tl.join(x2, x6))
        c1 = tl.join(tl.join(x1, x5), tl.join(x3, x7))
        x = tl.join(c0, c1)
    return tl.reshape(x, [BLOCK_R, BLOCK_G * M])


@triton.jit
def _nm_split_tile(
    w_ptr, mask_ptr, flag_ptr, grad_ptr, act_ptr, lam_ptr, n_rows, n_cols, stride_wr, stride_wc,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, WRITE_MASK: tl.constexpr,
    WRITE_WEIGHT: tl.constexpr, CHECK_FINITE: tl.constexpr,
):
    """M = 4 or 8: the group's members as separate tiles (see the module docstring)."""
    pid_r = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    cols = (pid_g * BLOCK_G * M + tl.arange(0, BLOCK_G * M))[None, :]
    w, keys, ok, w_ptrs = load_keys(
        w_ptr, rows, cols, rows < n_rows, cols < n_cols, stride_wr, stride_wc, grad_ptr, act_ptr,
        lam_ptr, n_rows, n_cols, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
    )
    k0, k1, k2, k3, k4, k5, k6, k7 = _split_group(keys, BLOCK_R, BLOCK_G, M)
    keep0 = _keep_lane(k0, k1, k2, k3, k4, k5, k6, k7, 0, N, M)
    keep1 = _keep_lane(k0, k1, k2, k3, k4, k5, k6, k7, 1, N, M)
    keep2 = _keep_lane(k0, k1, k2, k3, k4, k5, k6, k7, 2, N, M)
    keep3 = _keep_lane(k0, k1, k2, k3, k4, k5, k6, k7, 3, N, M)
    if M == 8:
        keep4 = _keep_lane(k0, k1, k2, k3, k4, k5, k6, k7, 4, N, M)
        keep5 = _keep_lane(k0, k1, k2, k3, k4, k5, k6, k7, 5, N, M)
        keep6 = _keep_lane(k0, k1, k2, k3, k4, k5, k6, k7, 6, N, M)
        keep7 = _keep_lane(k0, k1, k2, k3, k4, k5, k6, k7, 7, N, M)
    else:
        keep4, keep5, keep6, keep7 = keep0, keep1, keep2, keep3
    keep = _join_group(keep0, keep1, keep2, keep3, keep4, keep5, keep6, keep7, BLOCK_R, BLOCK_G,
                       M)
    if CHECK_FINITE:  # a group holding a NaN/Inf score is left as it is, and the flag is raised
        bad = tl.reshape(non_finite(keys), [BLOCK_R, BLOCK_G, M])
        group_bad = tl.max(bad, axis=2)
        keep = keep | tl.reshape(tl.broadcast_to(group_bad[:, :, None] > 0, [BLOCK_R, BLOCK_G, M]),
                                 [BLOCK_R, BLOCK_G * M])
        tl.atomic_max(flag_ptr, tl.max(tl.max(group_bad, axis=1), axis=0))
    if WRITE_MASK:
        tl.store(mask_ptr + rows * n_cols + cols, keep.to(tl.uint8), mask=ok)
    if WRITE_WEIGHT:
        tl.store(w_ptrs, tl.where(keep, w, tl.zeros_like(w)), mask=ok)


@triton.jit
def _nm_reduce_tile(
    w_ptr, mask_ptr, flag_ptr, grad_ptr, act_ptr, lam_ptr, n_rows, n_cols, n_groups, stride_wr,
    stride_wc, NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
    M_POW2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    WRITE_MASK: tl.constexpr, WRITE_WEIGHT: tl.constexpr, CHECK_FINITE: tl.constexpr,
):
    """Any M: a ``[BLOCK_R, BLOCK_G, M_POW2]`` tile, members taken out by reductions."""
    pid_r = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None, None]
    groups = (pid_g * BLOCK_G + tl.arange(0, BLOCK_G))[None, :, None]
    lanes = tl.arange(0, M_POW2)[None, None, :]
    cols = groups * M + lanes
    # padding lanes (lanes >= M) get the padding key: they never rank below a weight
    w, keys, ok, w_ptrs = load_keys(
        w_ptr, rows, cols, rows < n_rows, (lanes < M) & (groups < n_groups), stride_wr,
        stride_wc, grad_ptr, act_ptr, lam_ptr, n_rows, n_cols, NUM_STEPS, HAS_GRAD, HAS_ACT,
        HAS_LAMBDA, AGGREGATION,
    )

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
        bad = naive.non_finite_units(score, m) if check_finite else None
        return reference_result(weight, naive.nm_mask(score, n, m), bad, write_mask,
                                write_weight, left)

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
