"""Bad input gets a clear error before anything is written."""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive, nm, unstructured

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
@pytest.mark.parametrize("where", ["grad_norms", "act_norms", "step_weights"])
def test_non_finite_vectors(bad, where):
    inputs = {
        "grad_norms": torch.ones(1, 8, device=DEVICE),
        "act_norms": torch.ones(1, 16, device=DEVICE),
        "step_weights": torch.ones(1, device=DEVICE),
    }
    inputs[where].view(-1)[0] = bad
    weight = _weight()
    before = weight.clone()
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        ck.nm_prune_(weight, **inputs, n=2, m=4)
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        ck.unstructured_prune_(weight, **inputs, sparsity=0.5)
    assert torch.equal(weight, before), "nothing was written"


@pytest.fixture(params=["kernels", "reference"])
def path(request, monkeypatch):
    """Both paths of every function: the Triton kernels (compiled, or the interpreter) and the
    torch reference that runs where Triton does not."""
    if request.param == "reference":
        for module in (nm, unstructured):
            monkeypatch.setattr(module, "use_triton", lambda tensor: False)
    return request.param


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises_and_spares_only_its_group(path, bad):
    """The check is folded into the pass: a NaN/Inf raises after it; in place, the N:M group
    (the row) holding it is left as it was and every other one is pruned; per layer nothing is
    written. The same on both paths."""
    weight = _weight(8, 16)
    weight[3, 5] = bad
    acts = torch.rand(16, device=DEVICE) + 0.1
    for kw in ({}, {"check_finite": True}):
        with pytest.raises(ValueError, match="weight contains NaN or Inf"):
            ck.nm_mask(weight, None, acts, n=2, m=4, **kw)
    for prune, kw, spared in ((ck.nm_prune_, dict(n=2, m=4), (3, slice(4, 8))),
                              (ck.unstructured_prune_, dict(sparsity=0.5), (3, slice(None))),
                              (ck.unstructured_prune_, dict(sparsity=0.5, group="layer"), None)):
        target = weight.clone()
        with pytest.raises(ValueError, match="weight contains NaN or Inf"):
            prune(target, None, acts, **kw)
        if spared is None:
            assert torch.equal(target.nan_to_num(), weight.nan_to_num()), "nothing was written"
            continue
        expected = weight.clone()
        finite = torch.where(torch.isfinite(weight), weight, 0.0)
        keep = (ck.nm_mask if prune is ck.nm_prune_ else ck.unstructured_mask)(finite, None, acts, **kw)
        expected.masked_fill_(~keep, 0)
        expected[spared] = weight[spared]
        assert torch.equal(target.nan_to_num(), expected.nan_to_num())


OVERFLOW = dict(weight=[[4e30, 1.0, 2.0, 3.0]], grad_norms=[0.0], act_norms=[1e10, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("aggregation", ["sum", "sumsq"])
def test_scores_that_overflow_are_refused_on_both_paths(path, aggregation):
    """Finite inputs whose score is Inf (or Inf * 0 = NaN): a clear error, never a wrong count."""
    weight = torch.tensor(OVERFLOW["weight"], device=DEVICE)
    grads = torch.tensor(OVERFLOW["grad_norms"], device=DEVICE)
    acts = torch.tensor(OVERFLOW["act_norms"], device=DEVICE)
    if aggregation == "sumsq":  # only the square overflows
        weight, grads = torch.tensor([[1e20, 1.0, 2.0, 3.0]], device=DEVICE), None
    for call in (lambda **kw: ck.nm_mask(weight, grads, acts, n=2, m=4, **kw),
                 lambda **kw: ck.unstructured_mask(weight, grads, acts, sparsity=0.5, **kw),
                 lambda **kw: ck.unstructured_mask(weight, grads, acts, sparsity=0.5,
                                                   group="layer", **kw)):
        with pytest.raises(ValueError, match="overflows fp32"):
            call(aggregation=aggregation)


def test_max_keeps_a_nan_term_as_torch_maximum_does(path):
    """With aggregation="max", a step whose term is NaN (Inf x 0) makes the score NaN on both
    paths (torch.maximum propagates NaN; the kernels' maximum is told to): refused."""
    weight = torch.tensor([[4e30, 1.0, 2.0, 3.0]], device=DEVICE)
    grads = torch.tensor([[1.0], [0.0]], device=DEVICE)
    acts = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1e10, 1.0, 1.0, 1.0]], device=DEVICE)
    with pytest.raises(ValueError, match="overflows fp32"):
        ck.nm_mask(weight, grads, acts, n=2, m=4, aggregation="max")
    keep = ck.nm_mask(weight, grads, acts, n=2, m=4, aggregation="max", check_finite=False)
    score = naive.importance(weight, grads, acts, "max")
    assert bool(torch.isnan(score[0, 0])) and torch.equal(keep, naive.nm_mask(score, 2, 4))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75])
def test_non_finite_scores_ranked_as_torch_sort_without_the_check(sparsity):
    """check_finite=False: Inf and NaN scores ranked as a stable torch.sort ranks them (NaN
    last), so counts stay exact and both paths agree, per row, per layer and N:M."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 16, generator=gen)
    weight[0, 0], weight[1, :4] = 4e30, torch.tensor([4e30, 1e30, 1.0, 2.0])
    weight[2, 5], weight[3, 7] = float("nan"), -float("inf")
    weight = weight.to(DEVICE)
    grads = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0], device=DEVICE)
    acts = torch.full((16,), 1e10, device=DEVICE)
    score = naive.importance(weight, grads[None], acts[None])
    assert not bool(torch.isfinite(score).all())
    for group in ("row", "layer"):
        keep = ck.unstructured_mask(weight, grads, acts, sparsity=sparsity, group=group,
                                    check_finite=False)
        expected = naive.row_mask(score, sparsity) if group == "row" else \
            naive.layer_mask(score, sparsity)
        assert torch.equal(keep, expected), group
    for n, m in ((2, 4), (1, 4), (3, 8)):
        keep = ck.nm_mask(weight, grads, acts, n=n, m=m, check_finite=False)
        assert torch.equal(keep, naive.nm_mask(score, n, m))
        assert bool((keep.reshape(6, -1, m).sum(-1) == n).all())


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


@pytest.mark.parametrize("prune_n,prune_m", [(5, 4), (4, 4), (-1, 4), (2, 0), (2, 33)])
def test_wanda_mask_errors_speak_wandas_convention(prune_n, prune_m):
    with pytest.raises(ValueError, match=f"prune_n={prune_n}, prune_m={prune_m}: Wanda's N:M"):
        ck.wanda_mask(_weight().abs(), prune_n=prune_n, prune_m=prune_m)
    with pytest.raises(ValueError, match="prune_n=2, prune_m=3 needs the in-features divisible"):
        ck.wanda_mask(_weight().abs(), prune_n=2, prune_m=3)
    with pytest.raises(TypeError, match="prune_n must be an int"):
        ck.wanda_mask(_weight().abs(), prune_n=2.0, prune_m=4)
    with pytest.raises(ValueError, match="W_metric contains NaN or Inf"):
        ck.wanda_mask(torch.full((4, 8), float("inf"), device=DEVICE), sparsity_ratio=0.5)
    metric = torch.full((4, 8), float("inf"), device=DEVICE)
    pruned = ck.wanda_mask(metric, sparsity_ratio=0.5, check_finite=False)
    assert torch.equal(pruned.sum(1), torch.full((4,), 4, device=DEVICE))


def _every_function(weight=None, vectors=None, scaler_row=None):
    """Every public function, called with ``weight`` (or a good one) and optional vectors."""
    good = weight if weight is not None else _weight()
    kw = {"act_norms": vectors} if vectors is not None else {}
    return {
        "nm_mask": lambda: ck.nm_mask(good, n=2, m=4, **kw),
        "nm_prune_": lambda: ck.nm_prune_(good, n=2, m=4, **kw),
        "unstructured_mask": lambda: ck.unstructured_mask(good, sparsity=0.5, **kw),
        "unstructured_prune_": lambda: ck.unstructured_prune_(good, sparsity=0.5, group="layer", **kw),
        "importance": lambda: ck.importance(good, **kw),
        "wanda_mask(W_metric)": lambda: ck.wanda_mask(good, sparsity_ratio=0.5),
        "wanda_mask(weight)": lambda: ck.wanda_mask(
            weight=good, scaler_row=scaler_row if scaler_row is not None else
            torch.ones(good.shape[1], device=good.device), sparsity_ratio=0.5),
    }


def test_meta_and_fp8_tensors_raise_value_or_type_errors():
    """A tensor without values (meta) or of a dtype the kernels do not read (fp8) is a clear
    ValueError / TypeError, in every argument of every function."""
    fp8 = torch.float8_e4m3fn
    cases = {
        "meta weight": (_every_function(torch.ones(8, 16, device="meta")), ValueError, "meta"),
        "fp8 weight": (_every_function(_weight().to(fp8)), TypeError, "float8"),
        "meta act_norms": (_every_function(vectors=torch.ones(16, device="meta")), ValueError, "meta"),
        "fp8 act_norms": (_every_function(vectors=torch.ones(16, device=DEVICE).to(fp8)),
                          TypeError, "float8"),
        "meta scaler_row": (_every_function(scaler_row=torch.ones(16, device="meta")),
                            ValueError, "meta"),
        "fp8 scaler_row": (_every_function(scaler_row=torch.ones(16, device=DEVICE).to(fp8)),
                           TypeError, "float8"),
    }
    for case, (functions, error, words) in cases.items():
        for name, call in functions.items():
            if "scaler_row" in case and name != "wanda_mask(weight)":
                continue
            if "act_norms" in case and name.startswith("wanda"):
                continue
            with pytest.raises(error, match=words):
                call()
    with pytest.raises(ValueError, match="x is on the meta device"):
        ck.channel_sumsq_(torch.zeros(16, device="meta"), torch.ones(3, 16, device="meta"))
