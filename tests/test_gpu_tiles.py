"""The kernels with the tile sizes they use on a GPU (on the CPU the interpreter otherwise takes
bigger tiles, whose cost is per program): several programs per matrix, column chunk loops with a
partial last chunk, rows split over programs. Masks and weights against the references."""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive, nm, obs, stats, unstructured

from .helpers import DEVICE, make_norms, make_weight, same_bits
from .test_obs import block_weights, hessian_inverse_factor


@pytest.fixture(autouse=True)
def gpu_tiles(monkeypatch):
    for module in (nm, unstructured, obs, stats):
        monkeypatch.setattr(module, "interpreting", lambda: False)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (3, 5)], ids=str)
def test_nm_with_gpu_tiles(n, m):
    weight = make_weight(37, 70 * m, torch.bfloat16, "ties", seed=m)
    grads, acts = make_norms(2, 37, 1, "ties"), make_norms(2, 70 * m, 2, "ties")
    keep = ck.nm_mask(weight, grads, acts, n=n, m=m)
    assert torch.equal(keep, naive.nm_mask(naive.importance(weight, grads, acts), n, m))


@pytest.mark.parametrize("group,streamed", [("row", False), ("row", True), ("layer", True)],
                         ids=["row-on_chip", "row-streamed", "layer"])
def test_unstructured_with_gpu_tiles(group, streamed, monkeypatch):
    if streamed:
        monkeypatch.setattr(unstructured, "ON_CHIP_COLUMNS", 0)
    weight = make_weight(9, 2500, torch.float16, "ties", seed=1)  # 3 chunks, the last partial
    acts = make_norms(1, 2500, 2, "ties")
    score = naive.importance(weight, None, acts)
    for sparsity in (0.5, 0.9):
        keep = ck.unstructured_mask(weight, None, acts, sparsity=sparsity, group=group)
        expected = naive.row_mask(score, sparsity) if group == "row" else \
            naive.layer_mask(score, sparsity)
        assert torch.equal(keep, expected), sparsity


def test_obs_block_with_gpu_tiles():
    Hinv1 = hessian_inverse_factor(128, seed=2)
    W1 = block_weights(37, 128, seed=3, kind="ties")  # 3 programs of 16 rows
    reference = W1.clone()
    expected = naive.obs_block_(reference, Hinv1, None, 2, 4)
    got = ck.obs_block_(W1, Hinv1, n=2, m=4)
    assert same_bits(W1, reference) and same_bits(got.errors, expected[0])


def test_channel_sumsq_with_gpu_tiles():
    x = torch.randn(3, 50, 70, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    acc = ck.channel_sumsq_(torch.zeros(70, device=DEVICE), x)
    reference = naive.channel_sumsq(x)
    assert float((acc - reference).abs().max() / reference.abs().max()) < 1e-5
