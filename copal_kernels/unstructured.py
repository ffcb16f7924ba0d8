"""Fused importance + unstructured mask, without a sort.

Scores are ranked by their int32 keys (:mod:`copal_kernels._importance`), which order as a stable
``torch.sort`` orders the scores. The k-th smallest key is selected bit by bit, most significant
first, by counting; a final pass prunes every key below it and, among keys equal to it, the first
ones in column order (row-major for a layer), which is what a stable ascending sort would do.

* per row (Wanda's comparison group), one launch; a program owns ``BLOCK_R`` rows:
  - rows of up to ``ON_CHIP_COLUMNS`` columns are read once and held on chip: 31 binary passes
    (count the keys below a candidate) run over registers, then the row is written once;
  - longer rows are streamed in chunks of ``BLOCK_C`` columns: a radix select over 4-bit digits,
    8 passes that re-read the row (each counts the digits of the keys matching the prefix so far),
    then a final pass.
* per layer (one threshold for the whole matrix, the magnitude baseline): each radix pass is a
  launch that writes per-row digit counts; torch sums them and picks the digit on the device; the
  non-finite flag is read once before the final pass writes anything.
"""

import math
from typing import Optional

import torch

from . import naive
from ._dispatch import interpreting, reference_result, use_triton
from ._importance import importance_meta, load_keys, non_finite
from ._triton import tl, triton
from ._validate import check_importance_inputs, check_sparsity, non_finite_error

RADIX_BITS = 4
NUM_BINS = 1 << RADIX_BITS
NUM_PASSES = 32 // RADIX_BITS
ON_CHIP_COLUMNS = 32768  # rows up to this many columns are held on chip (LLaMA-65B's 22016)
GROUPS = ("row", "layer")


@triton.jit
def _score_keys(
    w_ptr, rows, cols, row_ok, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr, n_rows,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr,
):
    """Load a [BLOCK_R, BLOCK_C] tile of W; return (w, int32 keys of its scores, in-bounds mask)."""
    w, keys, ok, _ = load_keys(
        w_ptr, rows, cols, row_ok, cols < n_cols, stride_wr, stride_wc, grad_ptr, act_ptr,
        lam_ptr, n_rows, n_cols, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
    )
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
    """One radix pass over whole rows: ([BLOCK_R, NUM_BINS] digit counts at ``SHIFT``,
    [BLOCK_R] int32 1 where the row holds a NaN/Inf score)."""
    counts = tl.zeros([BLOCK_R, NUM_BINS], dtype=tl.int32)
    bad = tl.zeros([BLOCK_R], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        cols = (start + tl.arange(0, BLOCK_C))[None, :].to(tl.int64)
        _, keys, ok = _score_keys(
            w_ptr, rows, cols, row_ok, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr,
            n_rows, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
        )
        counts += _digit_counts(keys, ok, prefix, SHIFT, NUM_BINS, RADIX_BITS, BLOCK_R, BLOCK_C)
        if SHIFT + RADIX_BITS >= 32:  # the first pass sees every key
            bad = tl.maximum(bad, tl.max(non_finite(keys), axis=1))
    return counts, bad


@triton.jit
def _keep_tile(keys, ok, threshold, ties_to_prune, ties_seen, spared):
    """Keep-mask of a [BLOCK_R, BLOCK_C] tile: prune the keys below ``threshold`` and the ties
    ranked within the row's first ``ties_to_prune`` (``ties_seen`` counted in earlier tiles);
    rows with ``spared`` > 0 keep everything. Returns (keep, the tile's ties per row)."""
    tie = (keys == threshold[:, None]) & ok
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=1) + ties_seen[:, None]
    keep = ~((keys < threshold[:, None]) | (tie & (tie_rank <= ties_to_prune[:, None])))
    return keep | (spared[:, None] > 0), tl.sum(tie.to(tl.int32), axis=1)


@triton.jit
def _store_tile(w_ptr, mask_ptr, w, keep, ok, rows, cols, n_cols, stride_wr, stride_wc,
                WRITE_MASK: tl.constexpr, WRITE_WEIGHT: tl.constexpr):
    if WRITE_MASK:
        tl.store(mask_ptr + rows * n_cols + cols, keep.to(tl.uint8), mask=ok)
    if WRITE_WEIGHT:
        tl.store(w_ptr + rows * stride_wr + cols * stride_wc, tl.where(keep, w, tl.zeros_like(w)),
                 mask=ok)


@triton.jit
def _apply_rows(
    w_ptr, mask_ptr, rows, row_ok, threshold, ties_to_prune, spared, n_rows, n_cols, stride_wr,
    stride_wc, grad_ptr, act_ptr, lam_ptr,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_WEIGHT: tl.constexpr,
):
    """Stream the rows once more and prune them (see :func:`_keep_tile`)."""
    ties_seen = tl.zeros([BLOCK_R], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        cols = (start + tl.arange(0, BLOCK_C))[None, :].to(tl.int64)
        w, keys, ok = _score_keys(
            w_ptr, rows, cols, row_ok, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr,
            n_rows, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
        )
        keep, ties = _keep_tile(keys, ok, threshold, ties_to_prune, ties_seen, spared)
        _store_tile(w_ptr, mask_ptr, w, keep, ok, rows, cols, n_cols, stride_wr, stride_wc,
                    WRITE_MASK, WRITE_WEIGHT)
        ties_seen += ties


@triton.jit
def _row_select_kernel(
    w_ptr, mask_ptr, flag_ptr, grad_ptr, act_ptr, lam_ptr,
    n_rows, n_cols, stride_wr, stride_wc, num_pruned,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ON_CHIP: tl.constexpr,
    NUM_PASSES: tl.constexpr, NUM_BINS: tl.constexpr, RADIX_BITS: tl.constexpr,
    WRITE_MASK: tl.constexpr, WRITE_WEIGHT: tl.constexpr, CHECK_FINITE: tl.constexpr,
):
    """Per row: select the num_pruned-th smallest key, then prune (one launch). A row holding a
    NaN/Inf score raises the flag and, with CHECK_FINITE, is left as it is."""
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    row_ok = rows < n_rows
    no_ties_seen = tl.zeros([BLOCK_R], dtype=tl.int32)
    if ON_CHIP:  # the whole row in registers (BLOCK_C >= n_cols): read once, written once
        cols = tl.arange(0, BLOCK_C)[None, :].to(tl.int64)
        w, keys, ok = _score_keys(
            w_ptr, rows, cols, row_ok, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr,
            n_rows, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
        )
        # the largest key T with fewer than num_pruned keys below it is the num_pruned-th
        # smallest; built bit by bit (keys are non-negative: bit 31 is 0)
        threshold = tl.zeros([BLOCK_R], dtype=tl.int32)
        below = tl.zeros([BLOCK_R], dtype=tl.int32)
        for b in tl.static_range(31):
            candidate = threshold | (1 << (30 - b))
            count = tl.sum((keys < candidate[:, None]).to(tl.int32), axis=1)
            accept = count < num_pruned
            threshold = tl.where(accept, candidate, threshold)
            below = tl.where(accept, count, below)
        bad = tl.max(non_finite(keys), axis=1)
        spared = bad if CHECK_FINITE else no_ties_seen
        keep, _ = _keep_tile(keys, ok, threshold, num_pruned - below, no_ties_seen, spared)
        _store_tile(w_ptr, mask_ptr, w, keep, ok, rows, cols, n_cols, stride_wr, stride_wc,
                    WRITE_MASK, WRITE_WEIGHT)
    else:
        prefix = tl.zeros([BLOCK_R], dtype=tl.int32)
        remaining = tl.zeros([BLOCK_R], dtype=tl.int32) + num_pruned
        bad = no_ties_seen
        for p in tl.static_range(NUM_PASSES):
            counts, found = _count_rows(
                w_ptr, rows, row_ok, prefix, n_rows, n_cols, stride_wr, stride_wc, grad_ptr,
                act_ptr, lam_ptr, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION, BLOCK_R,
                BLOCK_C, 32 - RADIX_BITS * (p + 1), NUM_BINS, RADIX_BITS,
            )
            if p == 0:
                bad = found
            prefix, remaining = _choose_digit(counts, prefix, remaining, NUM_BINS, RADIX_BITS)
        # prefix is now the key of the num_pruned-th smallest score of each row
        _apply_rows(
            w_ptr, mask_ptr, rows, row_ok, prefix, remaining,
            bad if CHECK_FINITE else no_ties_seen, n_rows, n_cols, stride_wr, stride_wc,
            grad_ptr, act_ptr, lam_ptr, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
            BLOCK_R, BLOCK_C, WRITE_MASK, WRITE_WEIGHT,
        )
    if CHECK_FINITE:
        tl.atomic_max(flag_ptr, tl.max(bad, axis=0))


@triton.jit
def _layer_count_kernel(
    w_ptr, counts_ptr, prefix_ptr, grad_ptr, act_ptr, lam_ptr,
    n_rows, n_cols, stride_wr, stride_wc,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SHIFT: tl.constexpr,
    NUM_BINS: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """counts[out, NUM_BINS] int32: per row, digit counts of the keys matching *prefix_ptr (the
    non-finite check is the bracket pass's, which always runs first)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    row_ok = rows < n_rows
    prefix = tl.zeros([BLOCK_R], dtype=tl.int32) + tl.load(prefix_ptr)
    counts, _ = _count_rows(
        w_ptr, rows, row_ok, prefix, n_rows, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr,
        lam_ptr, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION, BLOCK_R, BLOCK_C, SHIFT,
        NUM_BINS, RADIX_BITS,
    )
    bins = tl.arange(0, NUM_BINS)[None, :]
    tl.store(counts_ptr + rows * NUM_BINS + bins, counts, mask=row_ok)


@triton.jit
def _bracket_kernel(
    w_ptr, counts_ptr, bounds_ptr, cand_keys_ptr, cand_rows_ptr, counter_ptr, flag_ptr, grad_ptr,
    act_ptr, lam_ptr, capacity, n_rows, n_cols, stride_wr, stride_wc,
    NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHECK_FINITE: tl.constexpr,
):
    """One pass against the bracket ``lo, hi = bounds``: per row, the keys below ``lo``, equal
    to ``lo`` and equal to ``hi`` (counts[3, out]); every key strictly between them appended,
    with its row, to the candidates (up to ``capacity``; the counter counts them all); the flag
    raised by a NaN/Inf score."""
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    row_ok = rows < n_rows
    lo = tl.load(bounds_ptr)
    hi = tl.load(bounds_ptr + 1)
    below = tl.zeros([BLOCK_R], dtype=tl.int32)
    at_lo = tl.zeros([BLOCK_R], dtype=tl.int32)
    at_hi = tl.zeros([BLOCK_R], dtype=tl.int32)
    bad = tl.zeros([BLOCK_R], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        cols = (start + tl.arange(0, BLOCK_C))[None, :].to(tl.int64)
        _, keys, ok = _score_keys(
            w_ptr, rows, cols, row_ok, n_cols, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr,
            n_rows, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
        )
        below += tl.sum((keys < lo).to(tl.int32), axis=1)
        at_lo += tl.sum((keys == lo).to(tl.int32), axis=1)
        at_hi += tl.sum((keys == hi).to(tl.int32), axis=1)
        bad = tl.maximum(bad, tl.max(non_finite(keys), axis=1))
        inside = ((keys > lo) & (keys < hi) & ok).to(tl.int32)
        flat = tl.reshape(inside, [BLOCK_R * BLOCK_C])
        count = tl.sum(flat, axis=0)
        if count > 0:
            base = tl.atomic_add(counter_ptr, count)
            slot = base + tl.cumsum(flat, axis=0) - 1
            keep = (flat > 0) & (slot < capacity)
            tl.store(cand_keys_ptr + slot, tl.reshape(keys, [BLOCK_R * BLOCK_C]), mask=keep)
            row_tile = tl.broadcast_to(rows, [BLOCK_R, BLOCK_C]).to(tl.int32)
            tl.store(cand_rows_ptr + slot, tl.reshape(row_tile, [BLOCK_R * BLOCK_C]), mask=keep)
    row_idx = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = row_idx < n_rows
    tl.store(counts_ptr + row_idx, below, mask=row_in)
    tl.store(counts_ptr + n_rows + row_idx, at_lo, mask=row_in)
    tl.store(counts_ptr + 2 * n_rows + row_idx, at_hi, mask=row_in)
    if CHECK_FINITE:
        tl.atomic_max(flag_ptr, tl.max(bad, axis=0))


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
        w_ptr, mask_ptr, rows, rows < n_rows, threshold, ties_to_prune,
        tl.zeros([BLOCK_R], dtype=tl.int32), n_rows, n_cols, stride_wr, stride_wc, grad_ptr,
        act_ptr, lam_ptr, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION, BLOCK_R,
        BLOCK_C, WRITE_MASK, WRITE_WEIGHT,
    )


def _tile(n_rows: int, n_cols: int, group: str):
    """(BLOCK_R, BLOCK_C, ON_CHIP, num_warps). Per row, a row of up to ON_CHIP_COLUMNS is one
    chunk held on chip, with more warps for longer rows; longer rows are streamed by few rows a
    program, which keeps them in L2 across the passes. Under the interpreter, whose cost is per
    program and per op, big tiles."""
    on_chip = group == "row" and n_cols <= ON_CHIP_COLUMNS
    if on_chip:
        block_c = triton.next_power_of_2(n_cols)
        elements = 65536 if interpreting() else 4096
    else:
        block_c = min(triton.next_power_of_2(n_cols), 4096 if interpreting() else 1024)
        elements = 65536 if interpreting() else (2048 if group == "row" else 4096)
    block_r = max(1, min(triton.next_power_of_2(n_rows), elements // block_c))
    num_warps = min(16, max(4, block_r * block_c // 1024))
    return block_r, block_c, on_chip, num_warps


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
            weight, counts, prefix,
            n_rows=n_rows, n_cols=n_cols, stride_wr=weight.stride(0), stride_wc=weight.stride(1),
            BLOCK_R=block_r, BLOCK_C=block_c, SHIFT=32 - RADIX_BITS * (p + 1),
            NUM_BINS=NUM_BINS, RADIX_BITS=RADIX_BITS, enable_fp_fusion=False, **meta,
        )
        totals = counts.sum(dim=0, dtype=torch.int64)
        digit = (totals.cumsum(0) < remaining).sum(dim=0, keepdim=True)
        remaining = remaining - torch.where(bins < digit, totals, 0).sum()
        prefix = (prefix << RADIX_BITS) | digit.to(torch.int32)
    # keys equal to the threshold, per row, are the last pass's counts of the chosen digit
    ties_per_row = counts.gather(1, digit.expand(n_rows, 1)).squeeze(1).to(torch.int64)
    return prefix, _share_ties(ties_per_row, remaining)


def _share_ties(ties_per_row, remaining):
    """The ties at the threshold to prune, per row (int32 [out]): ``remaining`` of them, shared
    out in row-major order."""
    ties_before_row = ties_per_row.cumsum(0) - ties_per_row
    ties_to_prune = (remaining - ties_before_row).clamp(min=0)
    return torch.minimum(ties_to_prune, ties_per_row).to(torch.int32)


SAMPLE_SIZE = 1 << 18  # scores sampled to bracket the layer's threshold
BRACKET_SIGMAS = 6.0  # the bracket's half-width in standard errors of the sampled quantile


def _bracket(weight, grads, acts, lambdas, aggregation, num_pruned):
    """(bounds int32 [2] on the device: the keys lo <= hi that hold the num_pruned-th smallest
    score with near certainty, from a fixed-seed sample of the scores (the torch reference's
    formula); capacity: room for the keys strictly between them, twice the sample's share and
    at least 4096). No host synchronisation."""
    n_rows, n_cols = weight.shape
    numel = weight.numel()
    gen = torch.Generator(device=weight.device).manual_seed(0)
    size = min(numel, SAMPLE_SIZE)
    index = torch.randint(numel, (size,), generator=gen, device=weight.device)
    rows, cols = index // n_cols, index % n_cols
    sample = naive.importance(weight[rows, cols], grads, acts, aggregation, lambdas,
                              at=(rows, cols))
    keys = torch.sort(naive.score_keys(sample)).values
    quantile = num_pruned / numel
    half_width = BRACKET_SIGMAS * math.sqrt(quantile * (1 - quantile) / size) + 2 / size
    lo_index = min(size - 1, max(0, math.floor((quantile - half_width) * size)))
    hi_index = min(size - 1, max(0, math.ceil((quantile + half_width) * size)))
    share = (hi_index - lo_index + 1) / size
    return keys[[lo_index, hi_index]], min(numel, int(2 * share * numel) + 4096)


def _layer_threshold_bracketed(weight, grads, acts, lambdas, aggregation, meta, num_pruned,
                               block_r, block_c, flag, left):
    """The layer's threshold from one pass over W against a sampled bracket ``[lo, hi]``: per
    row the keys below ``lo``, at ``lo`` and at ``hi`` counted, the keys strictly between
    gathered and ranked by torch (so ties at either end, as in an already sparse layer, need no
    room). Returns (threshold key [1] int32, ties to prune per row [out] int32), or None when
    the threshold lies outside the bracket or the candidates overflowed (the radix select then
    runs; its keys are these, so the flag holds for it too). One host synchronisation; raises
    the finite check's ValueError (``flag`` given and raised) before anything is written."""
    n_rows, n_cols = weight.shape
    device = weight.device
    bounds, capacity = _bracket(weight, grads, acts, lambdas, aggregation, num_pruned)
    counts = torch.empty(3, n_rows, dtype=torch.int32, device=device)  # below lo, at lo, at hi
    cand_keys = torch.empty(capacity, dtype=torch.int32, device=device)
    cand_rows = torch.empty(capacity, dtype=torch.int32, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    _bracket_kernel[(triton.cdiv(n_rows, block_r),)](
        weight, counts, bounds, cand_keys, cand_rows, counter,
        flag if flag is not None else counter, capacity=capacity, n_rows=n_rows, n_cols=n_cols,
        stride_wr=weight.stride(0), stride_wc=weight.stride(1), BLOCK_R=block_r, BLOCK_C=block_c,
        CHECK_FINITE=flag is not None, enable_fp_fusion=False, **meta,
    )
    flagged = flag if flag is not None else torch.zeros_like(counter)
    summary = torch.cat([flagged, counter, (bounds[:1] == bounds[1:]).int()]).long()
    bad, found, same_ends, below_lo, at_lo, at_hi = torch.cat(
        [summary, counts.sum(dim=1, dtype=torch.int64)]).tolist()  # the one host sync
    if bad:
        raise non_finite_error(weight, left)
    if num_pruned == 0:  # keys below 0: none
        return (torch.zeros(1, dtype=torch.int32, device=device),
                torch.zeros(n_rows, dtype=torch.int32, device=device))
    rank = num_pruned - below_lo  # the threshold's rank from lo on
    if rank < 1:
        return None
    if rank <= at_lo:
        return bounds[:1], _share_ties(counts[1].long(), rank)
    rank -= at_lo
    if same_ends or found > capacity:
        return None
    below = counts[0].long() + counts[1].long()
    keys, key_rows = cand_keys[:found], cand_rows[:found].long()
    if rank <= found:
        threshold = torch.kthvalue(keys, rank).values.reshape(1)
        below = below.scatter_add_(0, key_rows, (keys < threshold).long())
        ties = torch.zeros(n_rows, dtype=torch.int64, device=device).scatter_add_(
            0, key_rows, (keys == threshold).long())
        return threshold, _share_ties(ties, num_pruned - below.sum())
    if rank <= found + at_hi:
        below = below.scatter_add_(0, key_rows, torch.ones_like(key_rows))
        return bounds[1:], _share_ties(counts[2].long(), num_pruned - below.sum())
    return None


def _unstructured(weight, grad_norms, act_norms, sparsity, group, aggregation, step_weights,
                  write_mask, write_weight, check_finite):
    grads, acts, lambdas, steps = check_importance_inputs(
        weight, grad_norms, act_norms, aggregation, step_weights
    )
    check_sparsity(sparsity)
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    left = ("; the rows holding them were left as they were"
            if write_weight and group == "row" else "; nothing was written" if write_weight else "")
    if not use_triton(weight):
        score = naive.importance(weight, grads, acts, aggregation, lambdas)
        bad = naive.non_finite_units(score, None) if check_finite else None
        if bad is not None and group == "layer":  # one threshold: nothing is written
            raise non_finite_error(weight, left)
        keep = naive.row_mask(score, sparsity) if group == "row" else naive.layer_mask(score, sparsity)
        return reference_result(weight, keep, bad, write_mask, write_weight, left)

    n_rows, n_cols = weight.shape
    keep = torch.empty((n_rows, n_cols), dtype=torch.bool, device=weight.device) if write_mask else None
    mask_arg = keep.view(torch.uint8) if write_mask else weight
    flag = torch.zeros(1, dtype=torch.int32, device=weight.device) if check_finite else None
    meta = importance_meta(grads, acts, lambdas, steps, aggregation, weight)
    strides = dict(stride_wr=weight.stride(0), stride_wc=weight.stride(1))
    outputs = dict(WRITE_MASK=write_mask, WRITE_WEIGHT=write_weight, enable_fp_fusion=False)
    block_r, block_c, on_chip, num_warps = _tile(n_rows, n_cols, group)
    grid = (triton.cdiv(n_rows, block_r),)
    if group == "row":
        _row_select_kernel[grid](
            weight, mask_arg, flag if check_finite else weight, n_rows=n_rows, n_cols=n_cols,
            num_pruned=int(n_cols * sparsity), BLOCK_R=block_r, BLOCK_C=block_c, ON_CHIP=on_chip,
            NUM_PASSES=NUM_PASSES, NUM_BINS=NUM_BINS, RADIX_BITS=RADIX_BITS,
            CHECK_FINITE=check_finite, num_warps=num_warps, **strides, **outputs, **meta,
        )
    else:
        num_pruned = int(weight.numel() * sparsity)
        selected = _layer_threshold_bracketed(weight, grads, acts, lambdas, aggregation, meta,
                                              num_pruned, block_r, block_c, flag, left)
        if selected is None:  # the bracket missed: the radix select, 8 more passes
            selected = _layer_threshold(weight, meta, num_pruned, block_r, block_c)
        threshold, ties = selected
        _apply_kernel[grid](
            weight, mask_arg, threshold, ties, n_rows=n_rows, n_cols=n_cols,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps, **strides, **outputs, **meta,
        )
        return keep
    if check_finite and flag.item():  # the call's one host synchronisation
        raise non_finite_error(weight, left)
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
            :func:`copal_kernels.nm_mask` (per layer, the flag is read before anything is
            written).
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
    validated before anything is written. With ``check_finite``, a NaN/Inf score raises
    ``ValueError``: per layer before anything is written; per row after every row without one
    was pruned, the rows holding one left as they were.
    """
    return _unstructured(weight, grad_norms, act_norms, sparsity, group, aggregation,
                         step_weights, return_mask, True, check_finite)
