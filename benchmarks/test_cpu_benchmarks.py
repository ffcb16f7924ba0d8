"""pytest-benchmark cases of the CPU path (the torch references) against Wanda's original code
path, on one LLaMA-7B-sized attention projection split in four (1024 x 4096, bf16).

    .venv/bin/python -m pytest benchmarks --benchmark-only
"""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive

SHAPE = (1024, 4096)


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(*SHAPE, generator=gen).to(torch.bfloat16)
    scaler_row = torch.rand(SHAPE[1], generator=gen) * 4
    return weight, scaler_row


CASES = {
    "2:4-copal_kernels": lambda w, r: ck.wanda_mask(weight=w, scaler_row=r, prune_n=2, prune_m=4),
    "2:4-wanda_loop": lambda w, r: naive.wanda_loop_mask(w, r, 0, 2, 4),
    "row50-copal_kernels": lambda w, r: ck.wanda_mask(weight=w, scaler_row=r, sparsity_ratio=0.5),
    "row50-wanda_sort": lambda w, r: naive.wanda_loop_mask(w, r, 0.5, 0, 0),
    "layer50-magnitude": lambda w, r: ck.unstructured_mask(w, sparsity=0.5, group="layer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mask(benchmark, layer, case):
    weight, scaler_row = layer
    mask = benchmark(CASES[case], weight, scaler_row)
    assert mask.shape == weight.shape


def test_channel_sumsq(benchmark):
    x = torch.randn(4096, SHAPE[1]).to(torch.bfloat16)
    acc = torch.zeros(SHAPE[1])
    benchmark(ck.channel_sumsq_, acc, x)
