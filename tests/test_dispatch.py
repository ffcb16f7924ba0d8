"""The two paths of the dispatch give identical results; GPU-only checks at real LLaMA shapes."""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive
from copal_kernels._dispatch import use_triton

from .helpers import DEVICE, make_norms, make_weight

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(DEVICE != "cpu", reason="the reference path is the CPU path")
def test_paths_agree(monkeypatch):
    weight = make_weight(33, 96, torch.bfloat16, "ties", seed=1)
    grads, acts = make_norms(2, 33, 2, "ties"), make_norms(2, 96, 3, "ties")
    calls = [
        lambda: ck.nm_mask(weight, grads, acts, n=2, m=4),
        lambda: ck.unstructured_mask(weight, grads, acts, sparsity=0.5),
        lambda: ck.unstructured_mask(weight, grads, acts, sparsity=0.5, group="layer"),
        lambda: ck.wanda_mask(weight=weight, scaler_row=acts[0], sparsity_ratio=0.5),
        lambda: ck.unstructured_prune_(weight.clone(), grads, acts, sparsity=0.5, return_mask=True),
    ]
    for call in calls:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert use_triton(weight)
        from_triton = call()
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not use_triton(weight)
        assert torch.equal(from_triton, call())


@needs_cuda
@pytest.mark.parametrize("shape", [(4096, 11008), (11008, 4096)], ids=["4096x11008", "11008x4096"])
def test_llama_shapes_on_gpu(shape):
    weight = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    grads, acts = make_norms(3, shape[0], 1), make_norms(3, shape[1], 2)
    score = naive.importance(weight, grads, acts)
    assert torch.equal(ck.nm_mask(weight, grads, acts, n=2, m=4), naive.nm_mask(score, 2, 4))
    assert torch.equal(ck.unstructured_mask(weight, grads, acts, sparsity=0.5),
                       naive.row_mask(score, 0.5))
    assert torch.equal(ck.unstructured_mask(weight, grads, acts, sparsity=0.5, group="layer"),
                       naive.layer_mask(score, 0.5))
    x = torch.randn(8, 512, shape[1], device="cuda", dtype=torch.bfloat16)
    acc = ck.channel_sumsq_(torch.zeros(shape[1], device="cuda"), x)
    reference = naive.channel_sumsq(x)
    assert float((acc - reference).norm() / reference.norm()) < 1e-5
