"""The importance score formed in registers, shared by the N:M and unstructured kernels.

It performs exactly the floating-point operations of :func:`copal_kernels.naive.importance`, in
the same order, so masks are bit-identical to the reference. Launchers pass
``enable_fp_fusion=False`` so that ``score + lambda * term`` is never contracted into an FMA.
"""

import triton
import triton.language as tl

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
            score = tl.maximum(score, term)
        else:
            score = score + term
    return score


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
