"""Fused importance + unstructured mask, without a sort.

The fp32 score of a weight is non-negative, so its bit pattern read as an int32 (the *key*) orders
like the score itself (-0.0 is folded into +0.0 first). Selecting the k-th smallest key is a radix
select over 4-bit digits, most significant first: 8 passes, each counting the digits of the keys
that still match the prefix chosen so far. A final pass prunes every key below the k-th and, among
keys equal to it, the first ones in column order, which is what a stable ascending sort would do.

* per row (Wanda's comparison group): one program owns ``BLOCK_R`` rows and runs all passes and
  the final pass itself, streaming the rows in chunks of ``BLOCK_C`` columns (one launch);
* per layer (one threshold for the whole matrix, the magnitude baseline): each pass is a launch
  that writes per-row digit counts; torch sums them and picks the digit on the device (no host
  sync); ties at the threshold are pruned in row-major order.
"""

import warnings
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from . import naive
from ._dispatch import interpreting, use_triton
from ._importance import importance_meta, importance_tile
from ._validate import check_importance_inputs, check_sparsity

RADIX_BITS = 4
NUM_BINS = 1 << RADIX_BITS
NUM_PASSES = 32 // RADIX_BITS
PADDING_KEY = 0x7FFFFFFF  # above every finite non-negative fp32 key (+inf is 0x7F800000)
GROUPS = ("row", "layer")


@triton.jit
def _score_keys(
    w_ptr, rows, cols, row_ok, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr, n_rows,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr,
):
    """Load a [BLOCK_R, BLOCK_C] tile of W; return (w, int32 keys of its scores, in-bounds mask)."""
    col_ok = cols < n_cols
    ok = row_ok & col_ok
    w_ptrs = w_ptr + rows * stride_wr + cols * stride_wc
    w = tl.load(w_ptrs, mask=ok, other=0.0)
    score = importance_tile(
        tl.abs(w.to(tl.float32)), rows, cols, row_ok, col_ok, grad_ptr, act_ptr, lam_ptr,
        n_rows, n_cols, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
    )
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0: equal scores, equal keys
    keys = tl.where(ok, score.to(tl.int32, bitcast=True), 0x7FFFFFFF)
    return w, keys, ok


@triton.jit
def _digit_counts(keys, ok, prefix, SHIFT: tl.constexpr, NUM_BINS: tl.constexpr,
                  RADIX_BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_R, NUM_BINS] int32: per row, how many keys matching ``prefix`` (the digits above
    ``SHIFT``) have each digit at ``SHIFT``.

    One row reduction per digit, not ``tl.histogram``: with the histogram, the kernels compiled
    by Triton 3.6 on an H200 gave masks that differed from the reference on a 9 x 4999 matrix
    (a column loop with a partial last chunk), while the interpreter with the same tiles was
    exact; the histogram was the one op there with its own GPU lowering (which Triton has since
    reworked, triton-lang/triton#11767). Plain reductions lower the same everywhere."""
    if SHIFT + RADIX_BITS >= 32:
        match = ok
    else:
        match = ok & ((keys >> (SHIFT + RADIX_BITS)) == prefix[:, None])
    digits = tl.where(match, (keys >> SHIFT) & (NUM_BINS - 1), NUM_BINS)  # NUM_BINS: no bin
    bins = tl.arange(0, NUM_BINS)[None, :]
    counts = tl.zeros([BLOCK_R, NUM_BINS], dtype=tl.int32)
    for digit in tl.static_range(NUM_BINS):
        in_bin = tl.sum((digits == digit).to(tl.int32), axis=1)
        counts = tl.where(bins == digit, in_bin[:, None], counts)
    return counts


@triton.jit
def _choose_digit(counts, prefix, remaining, NUM_BINS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Per row, extend ``prefix`` by the digit holding the ``remaining``-th smallest key and
    subtract the keys of smaller digits from ``remaining``."""
    bins = tl.arange(0, NUM_BINS)[None, :]
    cumulative = tl.cumsum(counts, axis=1)
    digit = tl.sum((cumulative < remaining[:, None]).to(tl.int32), axis=1)
    below = tl.sum(tl.where(bins < digit[:, None], counts, 0), axis=1)
    return (prefix << RADIX_BITS) | digit, remaining - below


@triton.jit
def _count_rows(
    w_ptr, rows, row_ok, prefix, n_rows, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, SHIFT: tl.constexpr, NUM_BINS: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """One radix pass over whole rows: [BLOCK_R, NUM_BINS] digit counts at ``SHIFT``."""
    counts = tl.zeros([BLOCK_R, NUM_BINS], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        cols = (start + tl.arange(0, BLOCK_C))[None, :].to(tl.int64)
        _, keys, ok = _score_keys(
            w_ptr, rows, cols, row_ok, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr,
            n_rows, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
        )
        counts += _digit_counts(keys, ok, prefix, SHIFT, NUM_BINS, RADIX_BITS, BLOCK_R, BLOCK_C)
    return counts


@triton.jit
def _apply_rows(
    w_ptr, mask_ptr, rows, row_ok, threshold, ties_to_prune, n_rows, n_cols, stride_wr,
    stride_wc, grad_ptr, act_ptr, lam_ptr,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_WEIGHT: tl.constexpr,
):
    """Prune, per row, the keys below ``threshold`` and the first ``ties_to_prune`` keys equal
    to it in column order; write the mask and/or zero W."""
    ties_seen = tl.zeros([BLOCK_R], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        cols = (start + tl.arange(0, BLOCK_C))[None, :].to(tl.int64)
        w, keys, ok = _score_keys(
            w_ptr, rows, cols, row_ok, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr,
            n_rows, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
        )
        tie = (keys == threshold[:, None]) & ok
        tie_rank = tl.cumsum(tie.to(tl.int32), axis=1) + ties_seen[:, None]
        keep = ~((keys < threshold[:, None]) | (tie & (tie_rank <= ties_to_prune[:, None])))
        if WRITE_MASK:
            tl.store(mask_ptr + rows * n_cols + cols, keep.to(tl.uint8), mask=ok)
        if WRITE_WEIGHT:
            tl.store(w_ptr + rows * stride_wr + cols * stride_wc,
                     tl.where(keep, w, tl.zeros_like(w)), mask=ok)
        ties_seen += tl.sum(tie.to(tl.int32), axis=1)


@triton.jit
def _row_select_kernel(
    w_ptr, mask_ptr, grad_ptr, act_ptr, lam_ptr,
    n_rows, n_cols, stride_wr, stride_wc, num_pruned,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NUM_PASSES: tl.constexpr,
    NUM_BINS: tl.constexpr, RADIX_BITS: tl.constexpr,
    WRITE_MASK: tl.constexpr, WRITE_WEIGHT: tl.constexpr,
):
    """Per row: radix-select the num_pruned-th smallest key, then prune (one launch)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    row_ok = rows < n_rows
    prefix = tl.zeros([BLOCK_R], dtype=tl.int32)
    remaining = tl.zeros([BLOCK_R], dtype=tl.int32) + num_pruned
    for p in tl.static_range(NUM_PASSES):
        counts = _count_rows(
            w_ptr, rows, row_ok, prefix, n_rows, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr,
            lam_ptr, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION, BLOCK_R, BLOCK_C,
            32 - RADIX_BITS * (p + 1), NUM_BINS, RADIX_BITS,
        )
        prefix, remaining = _choose_digit(counts, prefix, remaining, NUM_BINS, RADIX_BITS)
    # prefix is now the key of the num_pruned-th smallest score of each row
    _apply_rows(
        w_ptr, mask_ptr, rows, row_ok, prefix, remaining, n_rows, n_cols, stride_wr, stride_wc,
        grad_ptr, act_ptr, lam_ptr, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
        BLOCK_R, BLOCK_C, WRITE_MASK, WRITE_WEIGHT,
    )


@triton.jit
def _layer_count_kernel(
    w_ptr, counts_ptr, prefix_ptr, grad_ptr, act_ptr, lam_ptr,
    n_rows, n_cols, stride_wr, stride_wc,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SHIFT: tl.constexpr,
    NUM_BINS: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """counts[out, NUM_BINS] int32: per row, digit counts of the keys matching *prefix_ptr."""
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    row_ok = rows < n_rows
    prefix = tl.zeros([BLOCK_R], dtype=tl.int32) + tl.load(prefix_ptr)
    counts = _count_rows(
        w_ptr, rows, row_ok, prefix, n_rows, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr,
        lam_ptr, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION, BLOCK_R, BLOCK_C, SHIFT,
        NUM_BINS, RADIX_BITS,
    )
    bins = tl.arange(0, NUM_BINS)[None, :]
    tl.store(counts_ptr + rows * NUM_BINS + bins, counts, mask=row_ok)


@triton.jit
def _apply_kernel(
    w_ptr, mask_ptr, threshold_ptr, ties_ptr, grad_ptr, act_ptr, lam_ptr,
    n_rows, n_cols, stride_wr, stride_wc,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    WRITE_MASK: tl.constexpr, WRITE_WEIGHT: tl.constexpr,
):
    """Prune keys below *threshold_ptr and the first ties_ptr[row] keys equal to it per row."""
    pid = tl.program_id(0).to(tl.int64)
    row_idx = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = row_idx[:, None]
    threshold = tl.zeros([BLOCK_R], dtype=tl.int32) + tl.load(threshold_ptr)
    ties_to_prune = tl.load(ties_ptr + row_idx, mask=row_idx < n_rows, other=0)
    _apply_rows(
        w_ptr, mask_ptr, rows, rows < n_rows, threshold, ties_to_prune, n_rows, n_cols,
        stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr, NUM_STEPS, HAS_GRAD, HAS_ACT,
        HAS_LAMBDA, AGGREGATION, BLOCK_R, BLOCK_C, WRITE_MASK, WRITE_WEIGHT,
    )


def _tile(n_rows: int, n_cols: int, per_row_passes: bool):
    """(BLOCK_R, BLOCK_C). On a GPU few rows a program keep a program's rows in L2 across the
    passes; under the interpreter, whose cost is per program and per op, big tiles."""
    block_c = min(triton.next_power_of_2(n_cols), 4096 if interpreting() else 1024)
    elements = 65536 if interpreting() else (2048 if per_row_passes else 4096)
    block_r = max(1, min(triton.next_power_of_2(n_rows), elements // block_c))
    return block_r, block_c


def _layer_threshold(weight, meta, num_pruned, block_r, block_c):
    """Radix select over the whole matrix. Returns (threshold key [1] int32, ties to prune per
    row [out] int32), all on the device."""
    n_rows, n_cols = weight.shape
    device = weight.device
    counts = torch.empty((n_rows, NUM_BINS), dtype=torch.int32, device=device)
    prefix = torch.zeros(1, dtype=torch.int32, device=device)
    remaining = torch.full((1,), num_pruned, dtype=torch.int64, device=device)
    bins = torch.arange(NUM_BINS, device=device)
    for p in range(NUM_PASSES):
        _layer_count_kernel[(triton.cdiv(n_rows, block_r),)](
            weight, counts, prefix, n_rows=n_rows, n_cols=n_cols,
            stride_wr=weight.stride(0), stride_wc=weight.stride(1),
            BLOCK_R=block_r, BLOCK_C=block_c, SHIFT=32 - RADIX_BITS * (p + 1),
            NUM_BINS=NUM_BINS, RADIX_BITS=RADIX_BITS, enable_fp_fusion=False, **meta,
        )
        totals = counts.sum(dim=0, dtype=torch.int64)
        digit = (totals.cumsum(0) < remaining).sum(dim=0, keepdim=True)
        remaining = remaining - torch.where(bins < digit, totals, 0).sum()
        prefix = (prefix << RADIX_BITS) | digit.to(torch.int32)
    # keys equal to the threshold, per row, are the last pass's counts of the chosen digit
    ties_per_row = counts.gather(1, digit.expand(n_rows, 1)).squeeze(1).to(torch.int64)
    ties_before_row = ties_per_row.cumsum(0) - ties_per_row
    ties_to_prune = (remaining - ties_before_row).clamp(min=0)
    ties_to_prune = torch.minimum(ties_to_prune, ties_per_row).to(torch.int32)
    return prefix, ties_to_prune


_TRUSTED: Dict[str, bool] = {}


def self_check(device) -> bool:
    """Run the kernels on ``device`` against the reference on a matrix like the one they once
    failed on (9 x 4999: several column chunks, the last partial; ties; two steps), per row and
    per layer. True when every mask is identical."""
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(9, 4999, generator=gen, device=device) * 2).round() / 2
    grads = torch.rand(2, 9, generator=gen, device=device) + 0.05
    acts = torch.rand(2, 4999, generator=gen, device=device) + 0.05
    score = naive.importance(weight, grads, acts)
    for group in GROUPS:
        for sparsity in (0.5, 0.9):
            reference = (naive.row_mask if group == "row" else naive.layer_mask)(score, sparsity)
            keep = _unstructured(weight, grads, acts, sparsity, group, "sum", None, True, False,
                                 False, skip_self_check=True)
            if not torch.equal(keep, reference):
                return False
    return True


def _trusted(device: torch.device) -> bool:
    """Whether to use the kernels on this GPU: :func:`self_check` once per device and process;
    on a mismatch, a warning and the torch reference from then on (same masks, slower)."""
    key = str(device)
    if key not in _TRUSTED:
        _TRUSTED[key] = self_check(device)  # runs the kernels with skip_self_check
        if not _TRUSTED[key]:
            warnings.warn(f"copal_kernels: the unstructured kernels compiled for {device} "
                          f"({torch.cuda.get_device_name(device)}, triton {triton.__version__}) "
                          "gave masks that differ from the reference in a self-check; using the "
                          "torch reference on this device (identical masks, slower)", RuntimeWarning)
    return _TRUSTED[key]


def _unstructured(weight, grad_norms, act_norms, sparsity, group, aggregation, step_weights,
                  write_mask, write_weight, check_finite, skip_self_check=False):
    grads, acts, lambdas, steps = check_importance_inputs(
        weight, grad_norms, act_norms, aggregation, step_weights, check_finite
    )
    check_sparsity(sparsity)
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    kernels = use_triton(weight) and (skip_self_check or not weight.is_cuda
                                      or _trusted(weight.device))
    if not kernels:
        score = naive.importance(weight, grads, acts, aggregation, lambdas)
        keep = naive.row_mask(score, sparsity) if group == "row" else naive.layer_mask(score, sparsity)
        if write_weight:
            weight.masked_fill_(~keep, 0)
        return keep if write_mask else None

    n_rows, n_cols = weight.shape
    keep = torch.empty((n_rows, n_cols), dtype=torch.bool, device=weight.device) if write_mask else None
    mask_arg = keep.view(torch.uint8) if write_mask else weight
    meta = importance_meta(grads, acts, lambdas, steps, aggregation, weight)
    strides = dict(stride_wr=weight.stride(0), stride_wc=weight.stride(1))
    outputs = dict(WRITE_MASK=write_mask, WRITE_WEIGHT=write_weight, enable_fp_fusion=False)
    if group == "row":
        block_r, block_c = _tile(n_rows, n_cols, per_row_passes=True)
        _row_select_kernel[(triton.cdiv(n_rows, block_r),)](
            weight, mask_arg, n_rows=n_rows, n_cols=n_cols, num_pruned=int(n_cols * sparsity),
            BLOCK_R=block_r, BLOCK_C=block_c, NUM_PASSES=NUM_PASSES, NUM_BINS=NUM_BINS,
            RADIX_BITS=RADIX_BITS, **strides, **outputs, **meta,
        )
    else:
        block_r, block_c = _tile(n_rows, n_cols, per_row_passes=False)
        threshold, ties = _layer_threshold(weight, meta, int(weight.numel() * sparsity),
                                           block_r, block_c)
        _apply_kernel[(triton.cdiv(n_rows, block_r),)](
            weight, mask_arg, threshold, ties, n_rows=n_rows, n_cols=n_cols,
            BLOCK_R=block_r, BLOCK_C=block_c, **strides, **outputs, **meta,
        )
    return keep


def unstructured_mask(
    weight: torch.Tensor,
    grad_norms: Optional[torch.Tensor] = None,
    act_norms: Optional[torch.Tensor] = None,
    *,
    sparsity: float,
    group: str = "row",
    aggregation: str = "sum",
    step_weights: Optional[torch.Tensor] = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Unstructured mask of the fused importance; nothing is mutated.

    Args:
        weight: ``W[out, in]``, fp32/fp16/bf16, any strides.
        grad_norms, act_norms, aggregation, step_weights, check_finite: as in
            :func:`copal_kernels.nm_mask`.
        sparsity: fraction pruned, in ``[0, 1)``.
        group: ``"row"`` prunes exactly ``int(in * sparsity)`` weights of every row (Wanda's
            comparison group); ``"layer"`` prunes exactly ``int(out * in * sparsity)`` weights of
            the whole matrix under one threshold (the magnitude baseline).

    Returns:
        bool ``[out, in]``, True = keep. Ties are pruned as a stable ascending sort would: the
        lower column (row-major index for ``"layer"``) first.
    """
    return _unstructured(weight, grad_norms, act_norms, sparsity, group, aggregation,
                         step_weights, True, False, check_finite)


def unstructured_prune_(
    weight: torch.Tensor,
    grad_norms: Optional[torch.Tensor] = None,
    act_norms: Optional[torch.Tensor] = None,
    *,
    sparsity: float,
    group: str = "row",
    aggregation: str = "sum",
    step_weights: Optional[torch.Tensor] = None,
    return_mask: bool = False,
    check_finite: bool = True,
) -> Optional[torch.Tensor]:
    """Like :func:`unstructured_mask`, but zeroes the pruned weights of ``weight`` **in place**.

    Returns the bool keep-mask ``[out, in]`` if ``return_mask`` else None. The inputs are fully
    validated before anything is written.
    """
    return _unstructured(weight, grad_norms, act_norms, sparsity, group, aggregation,
                         step_weights, return_mask, True, check_finite)
