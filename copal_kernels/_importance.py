"""The importance score formed in registers, shared by the N:M and unstructured kernels.

It performs exactly the floating-point operations of :func:`copal_kernels.naive.importance`, in
the same order, so masks are bit-identical to the reference. Launchers pass
``enable_fp_fusion=False`` so that ``score + lambda * term`` is never contracted into an FMA.

Kernels rank scores by their *keys*: the fp32 bits read as an int32. Scores are non-negative, so
keys order as the scores do once -0.0 is folded into +0.0 and every NaN is given one key above
+Inf's: the order of a stable ``torch.sort``, which puts NaN last. So the counts are exact for
every input, and a score that is not finite also raises a flag (``check_finite``).
"""


from . import naive
from ._triton import tl, triton
from ._validate import AGGREGATIONS


@triton.jit
def importance_tile(
    magnitude,  # fp32 tile |W|, any rank; rows and cols broadcast against it
    rows,  # int64 row indices, broadcastable to the tile
    cols,  # int64 column indices, broadcastable to the tile
    row_ok,
    col_ok,
    grad_ptr,  # fp32 [T, n_rows] contiguous (unused unless HAS_GRAD)
    act_ptr,  # fp32 [T, n_cols] contiguous (unused unless HAS_ACT)
    lam_ptr,  # fp32 [T] (unused unless HAS_LAMBDA)
    n_rows,
    n_cols,
    NUM_STEPS: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr,
    AGGREGATION: tl.constexpr,  # index in AGGREGATIONS: 0 sum, 1 max, 2 sumsq
):
    score = magnitude
    for t in tl.static_range(NUM_STEPS):
        term = magnitude
        if HAS_ACT:
            act = tl.load(act_ptr + t * n_cols + cols, mask=col_ok, other=0.0)
            term = term * act
        if HAS_GRAD:
            grad = tl.load(grad_ptr + t * n_rows + rows, mask=row_ok, other=0.0)
            term = term * grad
        if HAS_LAMBDA:
            term = tl.load(lam_ptr + t) * term
        if AGGREGATION == 2:  # sumsq
            term = term * term
        if t == 0:
            score = term
        elif AGGREGATION == 1:  # max
            score = tl.maximum(score, term, propagate_nan=tl.PropagateNan.ALL)  # as torch
        else:
            score = score + term
    return score


@triton.jit
def load_keys(
    w_ptr, rows, cols, row_ok, col_ok, stride_wr, stride_wc, grad_ptr, act_ptr, lam_ptr, n_rows,
    n_cols, NUM_STEPS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_LAMBDA: tl.constexpr, AGGREGATION: tl.constexpr,
):
    """Load the tile of W at (rows, cols) (any broadcastable index tiles); return (w, the keys
    of its scores, the in-bounds mask, the tile's pointers)."""
    ok = row_ok & col_ok
    w_ptrs = w_ptr + rows * stride_wr + cols * stride_wc
    w = tl.load(w_ptrs, mask=ok, other=0.0)
    score = importance_tile(
        tl.abs(w.to(tl.float32)), rows, cols, row_ok, col_ok, grad_ptr, act_ptr, lam_ptr,
        n_rows, n_cols, NUM_STEPS, HAS_GRAD, HAS_ACT, HAS_LAMBDA, AGGREGATION,
    )
    return w, score_keys(score, ok), ok, w_ptrs


# the keys of naive.score_keys, as the kernels' compile-time constants
INF_KEY = tl.constexpr(naive.INF_KEY)
NAN_KEY = tl.constexpr(naive.NAN_KEY)
PADDING_KEY = tl.constexpr(naive.PADDING_KEY)


@triton.jit
def score_keys(score, ok):
    """int32 keys of a tile of non-negative fp32 scores (see the module docstring); lanes
    outside ``ok`` get PADDING_KEY."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0: equal scores, equal keys
    keys = tl.where(score != score, NAN_KEY, score.to(tl.int32, bitcast=True))
    return tl.where(ok, keys, PADDING_KEY)


@triton.jit
def non_finite(keys):
    """int32 tile: 1 where the score is +Inf or NaN (padding lanes are not)."""
    return ((keys >= INF_KEY) & (keys != PADDING_KEY)).to(tl.int32)


def importance_meta(grads, acts, lambdas, steps, aggregation, placeholder):
    """Kernel arguments and constexprs describing the importance formula.

    ``placeholder`` (any tensor on the same device) stands in for absent vectors; the kernel never
    reads it.
    """
    dummy = placeholder
    return dict(
        grad_ptr=grads if grads is not None else dummy,
        act_ptr=acts if acts is not None else dummy,
        lam_ptr=lambdas if lambdas is not None else dummy,
        NUM_STEPS=steps,
        HAS_GRAD=grads is not None,
        HAS_ACT=acts is not None,
        HAS_LAMBDA=lambdas is not None,
        AGGREGATION=AGGREGATIONS.index(aggregation),
    )
