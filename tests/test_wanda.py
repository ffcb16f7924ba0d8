"""The Wanda drop-in against a transcription of Wanda's published prune loop, and COPAL's first
step against Wanda."""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive

from .helpers import DEVICE, DTYPES, dtype_id, make_weight


def _scaler_row(columns, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(columns, generator=gen) * 5).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "sparsity,prune_n,prune_m", [(0.5, 0, 0), (0.37, 0, 0), (0.5, 2, 4), (0.5, 4, 8)],
    ids=["unstructured50", "unstructured37", "2:4", "4:8"],
)
def test_wanda_mask_matches_wanda_loop(dtype, sparsity, prune_n, prune_m):
    weight = make_weight(45, 96, dtype, "random", seed=1)
    scaler_row = _scaler_row(96, 2)
    expected = naive.wanda_loop_mask(weight, scaler_row, sparsity, prune_n, prune_m)
    from_weight = ck.wanda_mask(weight=weight, scaler_row=scaler_row, sparsity_ratio=sparsity,
                                prune_n=prune_n, prune_m=prune_m)
    metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    from_metric = ck.wanda_mask(metric, sparsity_ratio=sparsity, prune_n=prune_n, prune_m=prune_m)
    assert torch.equal(from_weight, expected)
    assert torch.equal(from_metric, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_wanda_mask_unstructured_ties_match_stable_sort(dtype):
    weight = make_weight(30, 64, dtype, "flat", seed=3)
    scaler_row = torch.ones(64, device=DEVICE)
    expected = naive.wanda_loop_mask(weight, scaler_row, 0.5, 0, 0)
    assert torch.equal(ck.wanda_mask(weight=weight, scaler_row=scaler_row, sparsity_ratio=0.5),
                       expected)


@pytest.mark.parametrize("prune_n,prune_m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_wanda_mask_topk_ties_match_wandas_loop(prune_n, prune_m):
    """Heavily tied metrics (two and three levels): ``ties="topk"`` gives the masks of Wanda's
    per-group topk loop; the default stable rule keeps the same counts in every group."""
    for levels, seed in ((2, 0), (3, 1)):
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randint(1, levels + 1, (67, 96), generator=gen).float().to(DEVICE)
        scaler_row = torch.ones(96, device=DEVICE)
        expected = naive.wanda_loop_mask(weight, scaler_row, 0, prune_n, prune_m)
        topk = ck.wanda_mask(weight=weight, scaler_row=scaler_row, prune_n=prune_n,
                             prune_m=prune_m, ties="topk")
        assert torch.equal(topk, expected)
        assert torch.equal(ck.wanda_mask(weight, prune_n=prune_n, prune_m=prune_m, ties="topk"),
                           expected)
        stable = ck.wanda_mask(weight=weight, scaler_row=scaler_row, prune_n=prune_n,
                               prune_m=prune_m)
        assert torch.equal(stable.reshape(67, -1, prune_m).sum(-1),
                           expected.reshape(67, -1, prune_m).sum(-1))


def test_wanda_mask_errors_use_wandas_names():
    weight, scaler_row = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"sparsity_ratio must be a number in \[0, 1\), got 1.5"):
        ck.wanda_mask(weight=weight, scaler_row=scaler_row, sparsity_ratio=1.5)
    with pytest.raises(ValueError, match="prune_n=4, prune_m=4: Wanda's N:M prunes prune_n"):
        ck.wanda_mask(weight=weight, scaler_row=scaler_row, prune_n=4, prune_m=4)
    with pytest.raises(ValueError, match="ties must be 'stable' or 'topk'"):
        ck.wanda_mask(weight=weight, scaler_row=scaler_row, prune_n=2, prune_m=4, ties="first")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_copal_step_one_equals_wanda(pattern):
    """COPAL's first step (normalised gradient and activation norms) gives Wanda's mask, except
    where Wanda's own scores tie within rounding (METHOD.md)."""
    gen = torch.Generator().manual_seed(11)
    inputs = torch.randn(4, 64, 128, generator=gen).to(DEVICE)  # 4 samples x 64 tokens
    grads = torch.randn(4, 64, 48, generator=gen).to(DEVICE)
    weight = make_weight(48, 128, torch.bfloat16, "random", seed=12)
    act_sumsq = ck.channel_sumsq_(torch.zeros(128, device=DEVICE), inputs)
    grad_sumsq = ck.channel_sumsq_(torch.zeros(48, device=DEVICE), grads)
    act_norms = torch.sqrt(act_sumsq / (4 * 64))
    grad_norms = torch.sqrt(grad_sumsq / (4 * 64))
    aa, ga = act_norms / act_norms.mean(), grad_norms / grad_norms.mean()

    scaler_row = act_sumsq / 4  # Wanda: mean over samples of each sample's sum over tokens
    if pattern == "2:4":
        copal = ck.nm_mask(weight, ga, aa, n=2, m=4)
        wanda = ~ck.wanda_mask(weight=weight, scaler_row=scaler_row, prune_n=2, prune_m=4)
    else:
        copal = ck.unstructured_mask(weight, ga, aa, sparsity=0.5)
        wanda = ~ck.wanda_mask(weight=weight, scaler_row=scaler_row, sparsity_ratio=0.5)
    differ = copal != wanda
    if differ.any():  # allowed only between scores equal to within a few ulps
        metric = weight.abs().float() * torch.sqrt(scaler_row)
        kept_min = torch.where(wanda, metric, torch.inf).min(dim=1).values
        pruned_max = torch.where(~wanda, metric, -torch.inf).max(dim=1).values
        gap = (kept_min - pruned_max) / kept_min
        assert bool((gap[differ.any(dim=1)] < 1e-6).all())
    assert int(differ.sum()) <= 4
