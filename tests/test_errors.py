"""Bad input gets a clear error before anything is written."""

import pytest
import torch

import copal_kernels as ck

from .helpers import DEVICE


def _weight(rows=8, cols=16):
    return torch.randn(rows, cols, device=DEVICE)


def test_nm_in_not_divisible_by_m():
    with pytest.raises(ValueError, match="divisible by M=4"):
        ck.nm_mask(_weight(8, 18), n=2, m=4)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4), (2, 33), (2, 0)])
def test_nm_bad_pattern(n, m):
    with pytest.raises(ValueError, match="N:M"):
        ck.nm_mask(_weight(8, 64), n=n, m=m)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        ck.unstructured_mask(_weight(), sparsity=sparsity)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["weight", "grad_norms", "act_norms", "step_weights"])
def test_non_finite_inputs(bad, where):
    inputs = {
        "weight": _weight(),
        "grad_norms": torch.ones(1, 8, device=DEVICE),
        "act_norms": torch.ones(1, 16, device=DEVICE),
        "step_weights": torch.ones(1, device=DEVICE),
    }
    inputs[where].view(-1)[0] = bad
    weight = inputs.pop("weight")
    before = weight.clone()
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        ck.nm_prune_(weight, **inputs, n=2, m=4)
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        ck.unstructured_prune_(weight, **inputs, sparsity=0.5)
    assert torch.equal(weight.nan_to_num(), before.nan_to_num()), "nothing was written"


def test_shape_mismatches():
    weight = _weight()
    with pytest.raises(ValueError, match=r"grad_norms must be \[T, out\]"):
        ck.nm_mask(weight, torch.ones(1, 9, device=DEVICE), n=2, m=4)
    with pytest.raises(ValueError, match=r"act_norms must be \[T, in\]"):
        ck.nm_mask(weight, None, torch.ones(1, 15, device=DEVICE), n=2, m=4)
    with pytest.raises(ValueError, match="2 steps but act_norms has 3"):
        ck.nm_mask(weight, torch.ones(2, 8, device=DEVICE), torch.ones(3, 16, device=DEVICE),
                   n=2, m=4)
    with pytest.raises(ValueError, match=r"step_weights must be \[T\] = \[2\], got \(3,\)"):
        ck.nm_mask(weight, torch.ones(2, 8, device=DEVICE), None, n=2, m=4,
                   step_weights=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ck.nm_mask(torch.ones(2, 3, 4, device=DEVICE), n=2, m=4)
    with pytest.raises(ValueError, match="acc has 16 channels but x has 15"):
        ck.channel_sumsq_(torch.zeros(16, device=DEVICE), torch.ones(3, 15, device=DEVICE))


def test_device_mismatch():
    other = "meta"
    with pytest.raises(ValueError, match="act_norms is on meta"):
        ck.nm_mask(_weight(), None, torch.ones(16, device=other), n=2, m=4)
    with pytest.raises(ValueError, match="acc is on"):
        ck.channel_sumsq_(torch.zeros(16, device=other), torch.ones(3, 16, device=DEVICE))


def test_bad_types_and_options():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ck.nm_mask(torch.ones(4, 8, dtype=torch.int32, device=DEVICE), n=2, m=4)
    with pytest.raises(ValueError, match="non-negative"):
        ck.nm_mask(_weight(), None, -torch.ones(16, device=DEVICE), n=2, m=4)
    with pytest.raises(ValueError, match="aggregation"):
        ck.nm_mask(_weight(), n=2, m=4, aggregation="mean")
    with pytest.raises(ValueError, match="group"):
        ck.unstructured_mask(_weight(), sparsity=0.5, group="column")
    with pytest.raises(ValueError, match="step_weights given but there are no steps"):
        ck.nm_mask(_weight(), n=2, m=4, step_weights=torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="empty"):
        ck.nm_mask(torch.ones(0, 8, device=DEVICE), n=2, m=4)
    with pytest.raises(TypeError, match="acc must be a contiguous fp32"):
        ck.channel_sumsq_(torch.zeros(16, dtype=torch.float16, device=DEVICE), _weight())


def test_wanda_mask_bad_arguments():
    weight = _weight()
    with pytest.raises(ValueError, match="exactly one of W_metric or weight"):
        ck.wanda_mask(sparsity_ratio=0.5)
    with pytest.raises(ValueError, match="needs scaler_row"):
        ck.wanda_mask(weight=weight, sparsity_ratio=0.5)
    with pytest.raises(ValueError, match="non-negative"):
        ck.wanda_mask(weight, sparsity_ratio=0.5)
    with pytest.raises(ValueError, match="scaler_row must be finite and non-negative"):
        ck.wanda_mask(weight=weight, scaler_row=-torch.ones(16, device=DEVICE), sparsity_ratio=0.5)
    with pytest.raises(ValueError, match="N:M"):
        ck.wanda_mask(weight.abs(), prune_n=4, prune_m=4)
