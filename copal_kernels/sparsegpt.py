"""Drop-ins for the OBS loop of SparseGPT-style code: SparseGPT's ``fasterprune``
(IST-DASLab/sparsegpt), llm-compressor's ``SparseGPTModifier`` (``sgpt_sparsify.sparsify_weight``)
and their forks. Their block loop, per block of columns ``i1:i2``::

    W1 = W[:, i1:i2].clone(); Hinv1 = Hinv[i1:i2, i1:i2]
    mask1 = (unstructured: tmp = W1**2 / diag(Hinv1)**2; tmp <= sort(tmp)[int(numel * sparsity)])
    for i in range(count):   # per column: N:M group mask, error, rank-1 update
        ...
    W[:, i1:i2] = Q1; Losses += sum(Losses1, 1) / 2; W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

becomes :func:`sparsegpt_block_mask` and :func:`sparsegpt_block` (one fused kernel for the column
loop, :func:`copal_kernels.obs_block_`); :func:`sparsegpt_prune_` is the whole loop written with
them. The arguments keep the callers' conventions: ``prune_n`` weights of every ``prune_m`` are
**pruned** (``prune_n=2, prune_m=4`` is 2:4), masks are True = pruned. docs/kernels.md has the
patches and what they match.
"""

from typing import Optional, Tuple

import torch

from ._validate import check_pruned_of, check_sparsity
from .obs import MAX_BLOCK_COLUMNS, check_obs_inputs, obs_block_, run_obs_block
from .unstructured import unstructured_mask

MASK_RULES = ("upstream", "exact")


def sparsegpt_block_mask(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    sparsity: float,
    *,
    base: Optional[torch.Tensor] = None,
    rule: str = "upstream",
) -> torch.Tensor:
    """SparseGPT's unstructured mask of one block: bool ``[rows, B]``, **True = pruned**.

    Scores ``tmp = W1^2 / diag(Hinv1)^2`` (fp32 ``W1 [rows, B]``, ``Hinv1 [B, B]``; nothing is
    mutated). ``rule="upstream"``: SparseGPT's and llm-compressor's inclusive threshold,
    ``tmp <= sort(tmp)[int(numel * sparsity)]``, which prunes at least one weight more than
    ``int(numel * sparsity)`` per block (more on ties). ``rule="exact"``: exactly
    ``int(numel * sparsity)``, ties in row-major order (this project's SparseGPT).
    ``base`` (bool, True = pruned): llm-compressor's ``preserve_sparsity_mask``: its entries score
    0, and the block keeps ``base`` as it is when it already prunes ``int(numel * sparsity)``.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"rule must be one of {MASK_RULES}, got {rule!r}")
    check_sparsity(sparsity)
    check_obs_inputs(W1, Hinv1, base, None, None, need_pattern=False, max_columns=None)
    return _block_mask(W1, Hinv1, sparsity, base, rule)


def _block_mask(W1, Hinv1, sparsity, base, rule):
    """:func:`sparsegpt_block_mask` on inputs already checked."""
    diag = torch.diag(Hinv1).reshape((1, -1))
    tmp = W1 ** 2 / diag ** 2
    count = int(tmp.numel() * sparsity)
    if base is not None:
        if count <= int(base.sum()):
            return base.clone()
        tmp = (~base) * tmp
    if rule == "exact":
        return ~unstructured_mask(tmp, sparsity=sparsity, group="layer")
    thresh = torch.kthvalue(tmp.flatten(), count + 1).values  # sort(tmp)[count]
    return tmp <= thresh


def sparsegpt_block(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    mask1: Optional[torch.Tensor] = None,
    prune_n: int = 0,
    prune_m: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The column loop of one block: returns SparseGPT's ``(Q1, Err1, Losses1)``, fp32
    ``[rows, B]``; ``W1`` (fp32 ``[rows, B]``) and ``Hinv1`` (fp32 ``[B, B]``) are not mutated.

    ``prune_n == 0``: ``mask1`` (bool, True = pruned) is the block's mask. ``prune_n > 0``: the
    ``prune_n`` lowest ``w^2 / [H^-1]_jj^2`` of every ``prune_m`` columns are pruned, chosen when
    the loop reaches the group (ties to the lower column: SparseGPT's ``topk`` leaves them to the
    implementation); a ``mask1`` given too is llm-compressor's preserved mask (scored 0, kept
    pruned). Raises TypeError/ValueError before any work.
    """
    check_pruned_of(prune_n, prune_m, "SparseGPT")
    if prune_n == 0 and mask1 is None:
        raise ValueError("prune_n=0 (unstructured) needs mask1, the block's mask "
                         "(sparsegpt_block_mask)")
    Q1 = W1.clone()
    n, m = _kept_of(prune_n, prune_m)
    block = obs_block_(Q1, Hinv1, pruned=mask1, n=n, m=m)
    return Q1, block.errors, block.losses


def _kept_of(prune_n, prune_m):
    """(n kept, m) of obs_block_ from the callers' prune_n pruned of prune_m; (None, None) for
    unstructured."""
    return (prune_m - prune_n, prune_m) if prune_n else (None, None)


def sparsegpt_prune_(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    *,
    sparsity: float = 0.0,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    mask: Optional[torch.Tensor] = None,
    rule: str = "upstream",
) -> torch.Tensor:
    """SparseGPT's whole block loop (``fasterprune`` after ``Hinv`` is formed) with the fused
    block: **mutates** ``W`` (fp32 ``[rows, cols]``, dead columns already zeroed) into the pruned,
    updated weights; ``Hinv`` fp32 ``[cols, cols]`` is the upper Cholesky factor of the damped
    ``H^-1``. ``mask``: llm-compressor's preserved mask (bool ``[rows, cols]``, True = pruned;
    its entries are also spared by the trailing updates, as there). ``rule``: the unstructured
    block mask's, see :func:`sparsegpt_block_mask`. Returns the per-row losses, fp32 ``[rows]``
    (SparseGPT's ``Losses``). Every argument is checked before ``W`` is written."""
    check_obs_inputs(W, Hinv, mask, None, None, need_pattern=False, max_columns=None)
    check_sparsity(sparsity)
    if rule not in MASK_RULES:
        raise ValueError(f"rule must be one of {MASK_RULES}, got {rule!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) \
            or not 1 <= blocksize <= MAX_BLOCK_COLUMNS:
        raise ValueError(f"blocksize must be an int from 1 to {MAX_BLOCK_COLUMNS}, got {blocksize!r}")
    check_pruned_of(prune_n, prune_m, "SparseGPT")
    if prune_n and (blocksize % prune_m or W.shape[1] % prune_m):
        raise ValueError(f"prune_n={prune_n}, prune_m={prune_m} needs the block size "
                         f"({blocksize}) and the columns ({W.shape[1]}) divisible by prune_m: "
                         "N:M groups would straddle blocks")
    losses = torch.zeros(W.shape[0], dtype=torch.float32, device=W.device)
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2]
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = mask[:, i1:i2] if mask is not None else None
        if prune_n == 0:
            mask1 = _block_mask(W1, Hinv1, sparsity, mask1, rule)
        # everything obs_block_ checks per block is checked above for the whole layer; W1 is
        # W's view: updated in place
        block = run_obs_block(W1, Hinv1, mask1, *_kept_of(prune_n, prune_m))
        losses += torch.sum(block.losses, 1) / 2
        update = block.errors.matmul(Hinv[i1:i2, i2:])
        W[:, i2:] -= update if mask is None else (~mask[:, i2:]) * update
    return losses
