"""SparseGPT's sequential OBS loop over one block of columns, fused (Frantar & Alistarh 2023,
Algorithm 1; the project's SparseGPT and COPAL's reconstruction variant).

Per column ``i`` of a block of ``B`` columns, SparseGPT decides the column's mask (per N:M group,
at the group's first column, from the updated weights), computes the error
``(w - q) / [H^-1]_ii`` and subtracts its rank-1 product with row ``i`` of ``H^-1`` from the
columns not yet visited. In torch that is ``B`` small launches per block. Here one program owns
``BLOCK_R`` rows of the block, holds them on chip with the block's ``H^-1`` diagonal, and runs
the whole column loop itself; the trailing update of the columns after the block stays one
matmul (``W[:, end:] -= errors @ Hinv[start:end, end:]``), which the caller does.

The kernel performs the reference's floating-point operations in its order (products, then
differences; IEEE divisions), so on the same inputs it gives the reference's weights bit for bit.
"""

from typing import NamedTuple, Optional

import torch

from . import naive
from ._dispatch import interpreting, use_triton
from ._importance import score_keys
from ._triton import tl, triton
from ._validate import check_data, check_nm

MAX_BLOCK_COLUMNS = 256  # held on chip per program (SparseGPT's block is 128)


class OBSBlock(NamedTuple):
    """What the loop over one block gives besides the updated weights (all [rows, B])."""

    errors: torch.Tensor  # fp32, (w - q) / [H^-1]_ii per column: the trailing update's input
    losses: torch.Tensor  # fp32, (w - q)^2 / [H^-1]_ii^2 per weight (SparseGPT's Losses1)
    pruned: torch.Tensor  # bool, True = pruned: the mask that was used


@triton.jit
def _obs_block_kernel(
    w_ptr, hinv_ptr, pruned_ptr, mask_ptr, err_ptr, loss_ptr,
    n_rows, width, stride_wr, stride_wc, stride_hr, stride_hc,
    N: tl.constexpr, M: tl.constexpr, CHOOSE_GROUPS: tl.constexpr, HAS_PRUNED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    cols = tl.arange(0, BLOCK_B)[None, :]
    row_ok = rows < n_rows
    col_ok = cols < width
    ok = row_ok & col_ok
    w_ptrs = w_ptr + rows * stride_wr + cols * stride_wc
    out = rows * width + cols
    W = tl.load(w_ptrs, mask=ok, other=0.0)
    diag = tl.load(hinv_ptr + cols * stride_hr + cols * stride_hc, mask=col_ok, other=1.0)
    if HAS_PRUNED:
        pruned = tl.load(pruned_ptr + out, mask=ok, other=0).to(tl.int32)
    else:
        pruned = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
    errors = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    losses = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    for i in range(0, width):
        at_i = cols == i
        if CHOOSE_GROUPS:
            if i % M == 0:  # this group's mask, from the block as updated so far
                in_group = (cols >= i) & (cols < i + M)
                score = tl.where(pruned > 0, 0.0, tl.div_rn(W * W, diag * diag))
                keys = score_keys(score, ok & in_group)
                rank = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
                for k in tl.static_range(M):  # group members a stable sort puts first
                    key_k = tl.max(tl.where(cols == i + k, keys, -1), axis=1)[:, None]
                    before = (key_k < keys) | ((key_k == keys) & (i + k < cols))
                    rank += before.to(tl.int32)
                pruned = tl.where(in_group, tl.maximum((rank < M - N).to(tl.int32), pruned),
                                  pruned)
        # column i, exactly (the sign of a zero too): a sum of bit patterns, one of them not 0
        w = tl.sum(tl.where(at_i, W.to(tl.int32, bitcast=True), 0), axis=1).to(
            tl.float32, bitcast=True)
        p = tl.max(tl.where(at_i, pruned, 0), axis=1) > 0
        d = tl.load(hinv_ptr + i * stride_hr + i * stride_hc)
        q = tl.where(p, 0.0, w)
        diff = w - q
        loss = tl.div_rn(diff * diff, d * d)
        err = tl.div_rn(diff, d)
        h = tl.load(hinv_ptr + i * stride_hr + cols * stride_hc, mask=col_ok & (cols >= i),
                    other=0.0)
        W = tl.where(cols >= i, W - err[:, None] * h, W)
        W = tl.where(at_i, q[:, None], W)
        errors = tl.where(at_i, err[:, None], errors)
        losses = tl.where(at_i, loss[:, None], losses)
    tl.store(w_ptrs, W, mask=ok)
    tl.store(err_ptr + out, errors, mask=ok)
    tl.store(loss_ptr + out, losses, mask=ok)
    tl.store(mask_ptr + out, pruned.to(tl.uint8), mask=ok)


def check_obs_inputs(W1, Hinv1, pruned, n, m, *, need_pattern=True,
                     max_columns=MAX_BLOCK_COLUMNS):
    """TypeError/ValueError for bad OBS inputs (W1 [rows, B] and Hinv1 [B, B] fp32, a positive
    diagonal, a bool mask of W1's shape, an N:M pattern), before any work."""
    for tensor, name in ((W1, "W1"), (Hinv1, "Hinv1")):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (SparseGPT computes in fp32), got {tensor.dtype}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
        check_data(tensor, name)
    rows, width = W1.shape
    if tuple(Hinv1.shape) != (width, width):
        raise ValueError(f"Hinv1 must be [B, B] = [{width}, {width}] for W1 of shape "
                         f"{tuple(W1.shape)}, got {tuple(Hinv1.shape)}")
    if Hinv1.device != W1.device:
        raise ValueError(f"Hinv1 is on {Hinv1.device} but W1 is on {W1.device}")
    if max_columns and not 1 <= width <= max_columns:
        raise ValueError(f"a block has 1 to {max_columns} columns, got {width}")
    if not bool((torch.diagonal(Hinv1) > 0).all()):
        raise ValueError("Hinv1's diagonal must be positive (a block of the upper Cholesky "
                         "factor of the damped inverse Hessian)")
    if need_pattern and pruned is None and n is None:
        raise ValueError("give pruned (the block's mask), or n and m (N:M groups chosen in the "
                         "loop), or both (groups chosen around a mask kept pruned)")
    if pruned is not None:
        if not isinstance(pruned, torch.Tensor) or pruned.dtype != torch.bool \
                or tuple(pruned.shape) != tuple(W1.shape) or pruned.device != W1.device:
            raise ValueError(f"pruned must be a bool tensor of W1's shape {tuple(W1.shape)} on "
                             f"{W1.device}")
    if n is not None or m is not None:
        check_nm(width, n, m)


def obs_block_(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    *,
    pruned: Optional[torch.Tensor] = None,
    n: Optional[int] = None,
    m: Optional[int] = None,
) -> OBSBlock:
    """SparseGPT's OBS loop over one block of ``B`` columns, **mutating** ``W1``.

    Args:
        W1: fp32 ``[rows, B]``, any strides (a view of the layer's weight works), ``B <= 256``;
            on return, the block pruned and updated (SparseGPT's ``Q1``).
        Hinv1: fp32 ``[B, B]``, the block's square of the upper Cholesky factor of the damped
            ``H^-1`` (SparseGPT's ``Hinv[i1:i2, i1:i2]``), positive diagonal. Not mutated.
        pruned: bool ``[rows, B]``, True = pruned: the block's mask chosen beforehand
            (SparseGPT's unstructured ``mask1``), or None.
        n, m: N:M, ``n`` **kept** of every ``m`` consecutive columns (2:4 is ``n=2, m=4``),
            ``B % m == 0``; each group's mask is chosen when the loop reaches its first column,
            from the updated weights: the ``m - n`` lowest ``w^2 / [H^-1]_jj^2``, ties to the
            lower column (SparseGPT's ``topk`` leaves ties to the implementation). With
            ``pruned`` too, its entries score 0 and stay pruned (llm-compressor's
            ``preserve_sparsity_mask``).

    Returns:
        :class:`OBSBlock` (errors, losses, pruned), each ``[rows, B]``. The caller applies the
        trailing update ``W[:, i2:] -= errors @ Hinv[i1:i2, i2:]``.

    Raises:
        TypeError, ValueError: before any work (dtypes, shapes, devices, meta tensors, the
        pattern, a non-positive diagonal).

    On CUDA (or under ``TRITON_INTERPRET=1``) one Triton launch runs the whole loop; elsewhere
    :func:`copal_kernels.naive.obs_block_`, with the same result bit for bit.
    """
    check_obs_inputs(W1, Hinv1, pruned, n, m)
    return run_obs_block(W1, Hinv1, pruned, n, m)


def run_obs_block(W1, Hinv1, pruned, n, m) -> OBSBlock:
    """:func:`obs_block_` on inputs already checked (the block loops check a layer once)."""
    pruned = pruned.contiguous() if pruned is not None else None
    if not use_triton(W1):
        return OBSBlock(*naive.obs_block_(W1, Hinv1, pruned, n or 0, m or 0))
    rows, width = W1.shape
    errors = torch.empty((rows, width), dtype=torch.float32, device=W1.device)
    losses = torch.empty_like(errors)
    mask = torch.empty((rows, width), dtype=torch.bool, device=W1.device)
    block_b = triton.next_power_of_2(width)
    block_r = max(1, min(triton.next_power_of_2(rows), (65536 if interpreting() else 2048) // block_b))
    _obs_block_kernel[(triton.cdiv(rows, block_r),)](
        W1, Hinv1, pruned.view(torch.uint8) if pruned is not None else mask,
        mask.view(torch.uint8), errors, losses, rows, width, W1.stride(0), W1.stride(1),
        Hinv1.stride(0), Hinv1.stride(1), N=n or 0, M=m or 1, CHOOSE_GROUPS=n is not None,
        HAS_PRUNED=pruned is not None,
        BLOCK_R=block_r, BLOCK_B=block_b, num_warps=4, enable_fp_fusion=False,
    )
    return OBSBlock(errors, losses, mask)
