"""Fused importance + N:M mask against the torch reference, bit for bit."""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive

from .helpers import DEVICE, DTYPES, dtype_id, make_norms, make_weight

PATTERNS = [(2, 4), (4, 8), (1, 4), (3, 4), (7, 8), (3, 5), (5, 16), (7, 32)]
# rows not a multiple of any block; in an odd multiple of M
SHAPES = [(1, 3), (37, 5), (70, 33)]


def _inputs(rows, groups, m, dtype, kind, steps, seed):
    weight = make_weight(rows, groups * m, dtype, kind, seed)
    grads = make_norms(steps, rows, seed + 1, kind) if steps else None
    acts = make_norms(steps, groups * m, seed + 2, kind) if steps else None
    return weight, grads, acts


def _assert_exact_nm(keep, n, m):
    per_group = keep.reshape(keep.shape[0], -1, m).sum(-1)
    assert bool((per_group == n).all()), "every group keeps exactly N"


@pytest.mark.parametrize("kind", ["random", "ties", "flat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,m", PATTERNS, ids=lambda v: str(v))
def test_nm_mask_matches_reference(n, m, dtype, kind):
    for i, (rows, groups) in enumerate(SHAPES):
        weight, grads, acts = _inputs(rows, groups, m, dtype, kind, steps=2, seed=10 * n + m + i)
        keep = ck.nm_mask(weight, grads, acts, n=n, m=m)
        expected = naive.nm_mask(naive.importance(weight, grads, acts), n, m)
        assert keep.dtype == torch.bool and keep.shape == weight.shape
        assert torch.equal(keep, expected)
        _assert_exact_nm(keep, n, m)


IMPORTANCE_VARIANTS = [(0, "sum", False, "both")] + [
    (steps, aggregation, lambdas, vectors)
    for steps in (1, 3)
    for aggregation in ("sum", "max")
    for lambdas in (False, True)
    for vectors in ("both", "act_only", "grad_only")
] + [  # sumsq squares the same terms: one variant per vector set, lambdas and T = 1 once each
    (3, "sumsq", True, "both"), (3, "sumsq", False, "act_only"), (1, "sumsq", False, "grad_only")]
assert {variant[1] for variant in IMPORTANCE_VARIANTS} == set(ck.AGGREGATIONS)


def variant_id(variant):
    steps, aggregation, lambdas, vectors = variant
    return f"T{steps}-{aggregation}-{'lambda' if lambdas else 'no_lambda'}-{vectors}"


@pytest.mark.parametrize("variant", IMPORTANCE_VARIANTS, ids=variant_id)
def test_nm_importance_variants(variant):
    steps, aggregation, lambdas, vectors = variant
    weight, grads, acts = _inputs(45, 24, 4, torch.bfloat16, "ties", steps, seed=steps)
    grads = None if vectors == "act_only" else grads
    acts = None if vectors == "grad_only" else acts
    step_weights = torch.linspace(0.5, 2.0, steps, device=DEVICE) if lambdas else None
    keep = ck.nm_mask(weight, grads, acts, n=2, m=4, aggregation=aggregation,
                      step_weights=step_weights)
    score = naive.importance(weight, grads, acts, aggregation, step_weights)
    assert torch.equal(keep, naive.nm_mask(score, 2, 4))


def test_sumsq_of_raw_activation_norms_ranks_as_wanda_on_the_union():
    """sum_t (|W| a_t)^2 = (|W| sqrt(sum_t a_t^2))^2: Wanda's score on all steps' data together
    (equal token counts); sum and max of the norms rank differently."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 128, generator=gen).to(DEVICE)
    acts = (torch.rand(2, 128, generator=gen) + 0.1).to(DEVICE)
    union = ck.nm_mask(weight, None, acts.square().sum(0).sqrt(), n=2, m=4)
    assert torch.equal(ck.nm_mask(weight, None, acts, n=2, m=4, aggregation="sumsq"), union)
    for other in ("sum", "max"):
        assert not torch.equal(ck.nm_mask(weight, None, acts, n=2, m=4, aggregation=other), union)


def test_nm_magnitude_is_t0():
    weight = make_weight(33, 64, torch.float16, "random", 3)
    expected = naive.nm_mask(weight.abs().float(), 2, 4)
    assert torch.equal(ck.nm_mask(weight, n=2, m=4), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nm_prune_in_place(dtype):
    weight, grads, acts = _inputs(50, 40, 8, dtype, "ties", steps=2, seed=5)
    original = weight.clone()
    keep = ck.nm_prune_(weight, grads, acts, n=4, m=8, return_mask=True)
    assert torch.equal(keep, naive.nm_mask(naive.importance(original, grads, acts), 4, 8))
    assert torch.equal(weight, original * keep)
    assert ck.nm_prune_(original.clone(), grads, acts, n=4, m=8) is None


def test_nm_non_contiguous_weight():
    base = make_weight(64, 48, torch.float32, "random", 8)
    weight = base.t()  # [48, 64] with strides (1, 48)
    assert not weight.is_contiguous()
    keep = ck.nm_mask(weight, n=2, m=4)
    assert torch.equal(keep, naive.nm_mask(weight.abs().float(), 2, 4))
    expected = weight * keep
    strided = base.clone().t()
    ck.nm_prune_(strided, n=2, m=4)
    assert torch.equal(strided, expected)


def test_nm_ties_prune_lower_column_first():
    weight = torch.ones(3, 8, device=DEVICE)
    keep = ck.nm_mask(weight, n=2, m=4)
    expected = torch.tensor([False, False, True, True] * 2, device=DEVICE).expand(3, 8)
    assert torch.equal(keep, expected)


def test_nm_deterministic():
    weight, grads, acts = _inputs(40, 32, 4, torch.bfloat16, "random", steps=2, seed=9)
    masks = [ck.nm_mask(weight, grads, acts, n=2, m=4) for _ in range(3)]
    assert all(torch.equal(masks[0], mask) for mask in masks[1:])
