"""Channel statistics (sum of squares per feature, fp32, in place) against the torch reference."""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive

from .helpers import DEVICE, DTYPES, dtype_id, relative_error

SHAPES = [(1, 1), (7, 3), (300, 130), (2, 33, 70), (3, 5, 4, 257)]


def _random(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 3).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channel_sumsq_matches_reference(shape, dtype):
    x = _random(shape, dtype, seed=len(shape))
    acc = torch.zeros(shape[-1], device=DEVICE)
    out = ck.channel_sumsq_(acc, x)
    assert out is acc and acc.dtype == torch.float32
    assert relative_error(naive.channel_sumsq(x), acc) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_channel_sumsq_accumulates_in_place(dtype):
    first, second = _random((50, 96), dtype, 1), _random((4, 9, 96), dtype, 2)
    acc = torch.full((96,), 2.0, device=DEVICE)
    ck.channel_sumsq_(acc, first)
    ck.channel_sumsq_(acc, second)
    expected = 2.0 + naive.channel_sumsq(first) + naive.channel_sumsq(second)
    assert relative_error(expected, acc) < 1e-6


def test_channel_sumsq_non_contiguous():
    base = _random((80, 300), torch.bfloat16, 3)
    transposed = base.t()  # [300, 80], feature stride 300
    sliced = _random((6, 50, 40), torch.float16, 4)[:, ::3, 1::2]  # leading dims not mergeable
    for x in (transposed, sliced):
        assert not x.is_contiguous()
        acc = torch.zeros(x.shape[-1], device=DEVICE)
        ck.channel_sumsq_(acc, x)
        assert relative_error(naive.channel_sumsq(x.contiguous()), acc) < 1e-6


def test_channel_sumsq_deterministic_and_fp32_accumulation():
    # fp16 squares of 300 overflow fp16; the sums must be exact in fp32
    x = torch.full((1000, 16), 300.0, dtype=torch.float16, device=DEVICE)
    sums = []
    for _ in range(2):
        acc = torch.zeros(16, device=DEVICE)
        sums.append(ck.channel_sumsq_(acc, x))
    assert torch.equal(sums[0], sums[1])
    assert torch.equal(sums[0], torch.full((16,), 1000 * 300.0**2, device=DEVICE))


def test_channel_sumsq_empty_input_leaves_acc():
    acc = torch.ones(8, device=DEVICE)
    ck.channel_sumsq_(acc, torch.empty(0, 8, device=DEVICE))
    assert torch.equal(acc, torch.ones(8, device=DEVICE))
