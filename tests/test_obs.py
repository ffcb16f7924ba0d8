"""The fused OBS block loop against its torch reference (and SparseGPT's own loop, transcribed)."""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive

from .helpers import DEVICE, same_bits


def hessian_inverse_factor(columns, seed, samples=256):
    """SparseGPT's Hinv: the upper Cholesky factor of the inverse of a damped 2 X X^T / n from
    correlated random inputs."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=gen) / columns ** 0.5
    X = torch.randn(samples, columns, generator=gen) @ mixing + 0.1 * torch.randn(samples, columns, generator=gen)
    H = 2 * X.T @ X / samples
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(columns)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return Hinv.to(DEVICE)


def block_weights(rows, columns, seed, kind="random"):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=gen)
    if kind == "ties":  # few levels, signed zeros among them: N:M scores tie within a group
        W = (W * 2).round() / 2
        W[W == 0] = torch.where(torch.rand(int((W == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    return W.to(DEVICE)


def _run_both(W1, Hinv1, **kw):
    reference = W1.clone()
    expected = ck.OBSBlock(*naive.obs_block_(reference, Hinv1, kw.get("pruned"), kw.get("n", 0),
                                             kw.get("m", 0)))
    got = ck.obs_block_(W1, Hinv1, **kw)
    return reference, expected, got


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "2:4+kept-mask", "unstructured"])
@pytest.mark.parametrize("rows,start,end", [(37, 0, 128), (5, 128, 168), (1, 0, 8)],
                         ids=["full-block", "partial-last-block", "one-row"])
def test_obs_block_matches_reference_bit_for_bit(pattern, kind, rows, start, end):
    Hinv = hessian_inverse_factor(168, seed=rows)
    Hinv1 = Hinv[start:end, start:end]
    W1 = block_weights(rows, end - start, seed=end, kind=kind)
    if pattern == "unstructured":
        diag = torch.diag(Hinv1)
        score = W1 * W1 / (diag * diag)[None, :]
        kw = {"pruned": ~ck.unstructured_mask(score, sparsity=0.5, group="layer")}
    else:
        n, m = map(int, pattern.split("+")[0].split(":"))
        kw = {"n": n, "m": m}
        if pattern.endswith("kept-mask"):  # llm-compressor's preserved mask: at most 1 of 4
            gen = torch.Generator().manual_seed(rows)
            kept = torch.rand(rows, (end - start) // 4, 1, generator=gen) < 0.3
            kw["pruned"] = torch.cat([kept, torch.zeros(rows, (end - start) // 4, 3, dtype=torch.bool)],
                                     dim=2).reshape(rows, end - start).to(DEVICE)
    reference, expected, got = _run_both(W1, Hinv1, **kw)
    assert torch.equal(got.pruned, expected.pruned)
    assert same_bits(W1, reference)
    assert same_bits(got.errors, expected.errors) and same_bits(got.losses, expected.losses)
    kept = ~got.pruned
    if pattern != "unstructured":
        n, m = kw["n"], kw["m"]
        assert bool((kept.reshape(rows, -1, m).sum(-1) == n).all())
    if "pruned" in kw:
        assert bool(got.pruned[kw["pruned"]].all()), "the given mask stays pruned"
    assert bool((W1[got.pruned] == 0).all())


def test_obs_block_updates_a_strided_view_in_place():
    Hinv = hessian_inverse_factor(64, seed=3)
    W = block_weights(20, 96, seed=4)
    untouched = W.clone()
    view = W[:, 16:80]  # SparseGPT's W[:, i1:i2], not contiguous
    reference = view.clone()
    expected = naive.obs_block_(reference, Hinv, None, 2, 4)
    got = ck.obs_block_(view, Hinv, n=2, m=4)
    assert torch.equal(W[:, 16:80], reference) and torch.equal(got.errors, expected[0])
    assert torch.equal(W[:, :16], untouched[:, :16]) and torch.equal(W[:, 80:], untouched[:, 80:])


def test_obs_block_bad_arguments():
    Hinv1 = hessian_inverse_factor(8, seed=1)
    W1 = block_weights(4, 8, seed=2)
    with pytest.raises(ValueError, match="give pruned .* or n and m"):
        ck.obs_block_(W1, Hinv1)
    with pytest.raises(TypeError, match="W1 must be float32"):
        ck.obs_block_(W1.half(), Hinv1, n=2, m=4)
    with pytest.raises(ValueError, match=r"Hinv1 must be \[B, B\] = \[8, 8\]"):
        ck.obs_block_(W1, Hinv1[:4, :4], n=2, m=4)
    with pytest.raises(ValueError, match="divisible by M=3"):
        ck.obs_block_(W1, Hinv1, n=2, m=3)
    with pytest.raises(ValueError, match="diagonal must be positive"):
        ck.obs_block_(W1, -Hinv1, n=2, m=4)
    with pytest.raises(ValueError, match="pruned must be a bool tensor"):
        ck.obs_block_(W1, Hinv1, pruned=torch.zeros(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="meta"):
        ck.obs_block_(torch.ones(4, 8, device="meta"), Hinv1, n=2, m=4)
    with pytest.raises(ValueError, match="1 to 256 columns"):
        ck.obs_block_(block_weights(2, 512, 1), torch.eye(512, device=DEVICE), n=2, m=4)
