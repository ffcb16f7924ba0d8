"""Fused importance + unstructured (per-row and per-layer) mask against the torch reference."""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive, unstructured

from .helpers import DEVICE, DTYPES, dtype_id, make_norms, make_weight
from .test_nm import IMPORTANCE_VARIANTS, variant_id

# rows not a multiple of the block; columns odd, and longer than one column chunk
SHAPES = [(1, 7), (37, 100), (9, 4999)]
SPARSITIES = [0.0, 0.5, 0.7, 0.99]


def _reference(score, sparsity, group):
    return naive.row_mask(score, sparsity) if group == "row" else naive.layer_mask(score, sparsity)


def _assert_exact_counts(keep, sparsity, group):
    rows, cols = keep.shape
    if group == "row":
        assert bool(((~keep).sum(1) == int(cols * sparsity)).all())
    else:
        assert int((~keep).sum()) == int(rows * cols * sparsity)


@pytest.fixture(params=["on_chip", "streamed"])
def row_path(request, monkeypatch):
    """Per row, rows held on chip (a binary select over registers) or streamed in chunks (a
    radix select that re-reads them): both run every per-row test."""
    if request.param == "streamed":
        monkeypatch.setattr(unstructured, "ON_CHIP_COLUMNS", 0)
    return request.param


@pytest.mark.parametrize("group,path", [("row", "on_chip"), ("row", "streamed"),
                                        ("layer", "bracket"), ("layer", "radix")],
                         ids=["row-on_chip", "row-streamed", "layer-bracket", "layer-radix"])
@pytest.mark.parametrize("kind", ["random", "ties", "flat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_unstructured_mask_matches_reference(dtype, kind, group, path, monkeypatch):
    if path == "streamed":
        monkeypatch.setattr(unstructured, "ON_CHIP_COLUMNS", 0)
    if path == "radix":  # the bracket always misses: the radix select's 8 passes
        monkeypatch.setattr(unstructured, "_layer_threshold_bracketed", lambda *args: None)
    for i, (rows, cols) in enumerate(SHAPES):
        weight = make_weight(rows, cols, dtype, kind, seed=i)
        grads, acts = make_norms(2, rows, 100 + i, kind), make_norms(2, cols, 200 + i, kind)
        score = naive.importance(weight, grads, acts)
        for sparsity in SPARSITIES:
            keep = ck.unstructured_mask(weight, grads, acts, sparsity=sparsity, group=group)
            assert torch.equal(keep, _reference(score, sparsity, group)), (rows, cols, sparsity)
            _assert_exact_counts(keep, sparsity, group)


@pytest.mark.parametrize("variant", IMPORTANCE_VARIANTS, ids=variant_id)
def test_unstructured_importance_variants(variant, row_path):
    steps, aggregation, lambdas, vectors = variant
    weight = make_weight(21, 130, torch.float16, "ties", seed=steps)
    grads = make_norms(steps, 21, 1, "ties") if steps and vectors != "act_only" else None
    acts = make_norms(steps, 130, 2, "ties") if steps and vectors != "grad_only" else None
    step_weights = torch.linspace(0.5, 2.0, steps, device=DEVICE) if lambdas else None
    score = naive.importance(weight, grads, acts, aggregation, step_weights)
    for group in ("row", "layer"):
        keep = ck.unstructured_mask(weight, grads, acts, sparsity=0.5, group=group,
                                    aggregation=aggregation, step_weights=step_weights)
        assert torch.equal(keep, _reference(score, 0.5, group))


@pytest.mark.parametrize("group", ["row", "layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_unstructured_prune_in_place(dtype, group, row_path):
    weight = make_weight(30, 257, dtype, "ties", seed=4)
    acts = make_norms(1, 257, 5)
    original = weight.clone()
    keep = ck.unstructured_prune_(weight, None, acts, sparsity=0.6, group=group, return_mask=True)
    assert torch.equal(keep, _reference(naive.importance(original, None, acts), 0.6, group))
    assert torch.equal(weight, original * keep)


def test_unstructured_all_equal_prunes_lowest_columns_first(row_path):
    weight = torch.full((4, 10), 0.5, device=DEVICE)
    keep = ck.unstructured_mask(weight, sparsity=0.3)
    expected = (torch.arange(10, device=DEVICE) >= 3).expand(4, 10)
    assert torch.equal(keep, expected)
    layer = ck.unstructured_mask(weight, sparsity=0.3, group="layer")  # 12 of 40, row-major
    assert torch.equal(layer.reshape(-1), torch.arange(40, device=DEVICE) >= 12)


def test_unstructured_signed_zeros_tie(row_path):
    weight = torch.tensor([[0.0, -0.0, 0.0, -0.0, 1.0, 2.0]], device=DEVICE)
    acts = torch.tensor([1.0, 1.0, -0.0, 0.0, 1.0, 1.0], device=DEVICE).abs()
    keep = ck.unstructured_mask(weight, None, acts, sparsity=0.5)
    expected = torch.tensor([[False, False, False, True, True, True]], device=DEVICE)
    assert torch.equal(keep, expected)


def test_unstructured_non_contiguous_weight(row_path):
    weight = make_weight(90, 40, torch.bfloat16, "ties", seed=6).t()
    for group in ("row", "layer"):
        keep = ck.unstructured_mask(weight, sparsity=0.5, group=group)
        assert torch.equal(keep, _reference(weight.abs().float(), 0.5, group))


def test_unstructured_deterministic():
    weight = make_weight(40, 300, torch.bfloat16, "random", seed=7)
    for group in ("row", "layer"):
        masks = [ck.unstructured_mask(weight, sparsity=0.5, group=group) for _ in range(3)]
        assert all(torch.equal(masks[0], mask) for mask in masks[1:])


def test_layer_bracket_falls_back_when_it_misses_or_overflows(monkeypatch):
    """A sampled bracket that misses the threshold, or holds more candidates than it has room
    for, is detected and the radix select runs: the same exact mask."""
    bracket = unstructured._bracket
    above_all = torch.full((2,), 0x7F000000, dtype=torch.int32, device=DEVICE)  # 1.7e38
    for kind, fake in (("ties", lambda *a: (above_all, 4096)),  # every key below lo: a miss
                       ("random", lambda *a: (bracket(*a)[0], 1))):  # room for one: overflow
        weight = make_weight(37, 100, torch.float32, kind, seed=3)
        expected = naive.layer_mask(weight.abs().float(), 0.5)
        calls = []
        monkeypatch.setattr(unstructured, "_bracket", fake)
        monkeypatch.setattr(unstructured, "_layer_threshold",
                            lambda *a, f=unstructured._layer_threshold: calls.append(1) or f(*a))
        keep = ck.unstructured_mask(weight, sparsity=0.5, group="layer")
        assert torch.equal(keep, expected) and calls == [1]
        monkeypatch.undo()


def test_layer_bracket_needs_no_room_for_ties_at_its_ends(monkeypatch):
    """An already sparse layer pruned again (magnitude, cascade): the threshold is 0, held by
    thousands of tied zeros at the bracket's end; no candidate room, no radix passes."""
    weight = make_weight(64, 256, torch.float32, "random", seed=5)
    weight[torch.rand(64, 256, generator=torch.Generator().manual_seed(6)).to(DEVICE) < 0.6] = 0
    calls = []
    monkeypatch.setattr(unstructured, "_layer_threshold", lambda *a: calls.append(1))
    for sparsity in (0.3, 0.5, 0.59):
        keep = ck.unstructured_mask(weight, sparsity=sparsity, group="layer")
        assert torch.equal(keep, naive.layer_mask(weight.abs().float(), sparsity))
    assert calls == []
