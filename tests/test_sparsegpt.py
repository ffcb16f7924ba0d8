"""The SparseGPT drop-ins against a transcription of SparseGPT's and llm-compressor's block loop
(naive.sparsegpt_loop_prune_)."""

import pytest
import torch

import copal_kernels as ck
from copal_kernels import naive

from .helpers import DEVICE, relative_error
from .test_obs import block_weights, hessian_inverse_factor

COLUMNS = 320  # two blocks of 128 and a partial one of 64


def _both(pattern, mask=None, rule="upstream", rows=24, seed=0, block_local_mask=True):
    Hinv = hessian_inverse_factor(COLUMNS, seed=seed)
    W = block_weights(rows, COLUMNS, seed=seed + 1)
    if mask is not None:
        W[mask] = 0
    prune_n, prune_m = (0, 0) if pattern == "50%" else (lambda n, m: (m - n, m))(
        *map(int, pattern.split(":")))
    theirs, ours = W.clone(), W.clone()
    their_losses = naive.sparsegpt_loop_prune_(theirs, Hinv, 0.5, prune_n, prune_m, 128, mask,
                                               block_local_mask)
    our_losses = ck.sparsegpt_prune_(ours, Hinv, sparsity=0.5, prune_n=prune_n, prune_m=prune_m,
                                     blocksize=128, mask=mask, rule=rule)
    return theirs, ours, their_losses, our_losses


@pytest.mark.parametrize("pattern", ["50%", "2:4", "4:8"])
def test_sparsegpt_prune_matches_sparsegpts_loop(pattern):
    theirs, ours, their_losses, our_losses = _both(pattern)
    assert torch.equal(ours == 0, theirs == 0), "the same weights pruned"
    assert relative_error(theirs, ours) < 1e-5 and relative_error(their_losses, our_losses) < 1e-5


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_sparsegpt_prune_matches_llm_compressors_preserved_mask(pattern):
    """llm-compressor's preserve_sparsity_mask. Its N:M path reads the base mask at the column
    within the block (the first block's, from the second block on); the drop-in reads each
    group's own columns, and equals llm-compressor's loop with that index corrected."""
    gen = torch.Generator().manual_seed(5)
    base = (torch.rand(24, COLUMNS, generator=gen) < 0.2).to(DEVICE)
    if pattern == "2:4":  # a 2:4-compatible base: at most 2 of every 4
        base = base.reshape(24, -1, 4)
        base[..., 2:] = False
        base = base.reshape(24, COLUMNS)
    theirs, ours, _, _ = _both(pattern, mask=base, block_local_mask=False)
    assert torch.equal(ours == 0, theirs == 0)
    assert bool((ours[base] == 0).all())
    assert relative_error(theirs, ours) < 1e-5
    upstream, ours, _, _ = _both(pattern, mask=base)
    assert torch.equal((ours == 0)[:, :128], (upstream == 0)[:, :128])
    if pattern == "2:4":  # upstream: from the second block on, base entries not scored 0 can
        # be pruned on top of the prune_n lowest others: more than 2 of 4, no longer 2:4
        pruned_per_group = (upstream == 0).reshape(24, -1, 4).sum(-1)
        assert int(pruned_per_group[:, :32].max()) == 2 and int(pruned_per_group.max()) > 2
        assert bool(((ours == 0).reshape(24, -1, 4).sum(-1) == 2).all())


def test_exact_rule_prunes_the_count_and_upstream_one_more_per_block():
    theirs, ours, _, _ = _both("50%", rule="exact")
    rows = theirs.shape[0]
    for start in range(0, COLUMNS, 128):
        block = slice(start, min(start + 128, COLUMNS))
        width = block.stop - block.start
        assert int((ours[:, block] == 0).sum()) == int(rows * width * 0.5)
        assert int((theirs[:, block] == 0).sum()) == int(rows * width * 0.5) + 1


def test_sparsegpt_block_returns_their_three_tensors():
    Hinv1 = hessian_inverse_factor(64, seed=3)
    W1 = block_weights(10, 64, seed=4)
    before = W1.clone()
    Q1, Err1, Losses1 = ck.sparsegpt_block(W1, Hinv1, None, 2, 4)
    assert torch.equal(W1, before), "W1 is not mutated"
    expected = W1.clone()
    errors, losses, _ = naive.obs_block_(expected, Hinv1, None, 2, 4)
    assert torch.equal(Q1, expected) and torch.equal(Err1, errors) and torch.equal(Losses1, losses)
    mask1 = ck.sparsegpt_block_mask(W1, Hinv1, 0.5)
    tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
    assert torch.equal(mask1, tmp <= torch.sort(tmp.flatten())[0][int(tmp.numel() * 0.5)])


def test_sparsegpt_drop_in_errors_speak_its_convention():
    Hinv = hessian_inverse_factor(16, seed=1)
    W = block_weights(4, 16, seed=2)
    before = W.clone()
    with pytest.raises(ValueError, match="prune_n=5, prune_m=4: SparseGPT's N:M"):
        ck.sparsegpt_prune_(W, Hinv, prune_n=5, prune_m=4)
    with pytest.raises(ValueError, match="needs the block size .* divisible by prune_m"):
        ck.sparsegpt_prune_(W, Hinv, prune_n=2, prune_m=4, blocksize=6)
    with pytest.raises(ValueError, match="rule must be one of"):
        ck.sparsegpt_prune_(W, Hinv, sparsity=0.5, rule="inclusive")
    with pytest.raises(ValueError, match="sparsity"):
        ck.sparsegpt_prune_(W, Hinv, sparsity=1.0)
    with pytest.raises(ValueError, match="needs mask1"):
        ck.sparsegpt_block(W, Hinv)
    with pytest.raises(ValueError, match="diagonal must be positive"):
        bad = Hinv.clone()
        bad[9, 9] = 0
        ck.sparsegpt_prune_(W, bad, prune_n=2, prune_m=4)
    assert torch.equal(W, before), "nothing written"
