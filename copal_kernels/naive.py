"""Pure-torch references of every op: the oracle of the tests and the CPU path of the dispatch.

Inputs are assumed validated (see :mod:`copal_kernels._validate`): ``grad_norms`` fp32 [T, out],
``act_norms`` fp32 [T, in], ``step_weights`` fp32 [T] or None. Masks are bool with True = keep.
The floating-point operations and their order here are the contract the Triton kernels match bit
for bit; so is the order of a stable ``torch.sort``, ties and NaN (last) included.
"""

from typing import Optional

import torch


def importance(
    weight: torch.Tensor,
    grad_norms: Optional[torch.Tensor] = None,
    act_norms: Optional[torch.Tensor] = None,
    aggregation: str = "sum",
    step_weights: Optional[torch.Tensor] = None,
    *,
    at: Optional[tuple] = None,
) -> torch.Tensor:
    """Materialised importance, fp32 [out, in]; or, with ``at = (rows, cols)`` (int64 [k]),
    ``weight`` holds the entries ``W[rows, cols]`` [k] and their scores [k] are returned.

    ``score = |W|`` when there are no steps (T = 0); otherwise, over steps t,
    ``term_t = lambda_t * ((|W| * A[t, j]) * G[t, i])`` combined by ``sum`` (in step order),
    ``max``, or ``sumsq``: the sum of ``term_t * term_t`` (the OBD saliencies, whose sum is the
    saliency under the summed Fishers of all steps; it ranks as the root-sum-square does). A
    missing G or A is a factor of one, a missing lambda is one: both are skipped, which is exact.
    Wanda's product ``|W| * A`` comes first so that step 1 reproduces Wanda's scores.
    """
    magnitude = weight.abs().to(torch.float32)
    steps = grad_norms.shape[0] if grad_norms is not None else (
        act_norms.shape[0] if act_norms is not None else 0
    )
    score = magnitude
    for t in range(steps):
        term = magnitude
        if act_norms is not None:
            term = term * (act_norms[t][None, :] if at is None else act_norms[t][at[1]])
        if grad_norms is not None:
            term = term * (grad_norms[t][:, None] if at is None else grad_norms[t][at[0]])
        if step_weights is not None:
            term = step_weights[t] * term
        if aggregation == "sumsq":
            term = term * term
        if t == 0:
            score = term
        elif aggregation == "max":
            score = torch.maximum(score, term)
        else:
            score = score + term
    return score


INF_KEY = 0x7F800000  # +Inf's bits read as int32
NAN_KEY = 0x7FC00000  # every NaN's key: the canonical quiet NaN, above +Inf's
PADDING_KEY = 0x7FFFFFFF  # the kernels' lanes outside the matrix: above every score's key


def score_keys(score: torch.Tensor) -> torch.Tensor:
    """int32 keys of non-negative fp32 scores, ordered as a stable ``torch.sort`` orders the
    scores: -0.0 folded into +0.0, every NaN one key above +Inf's (see
    :mod:`copal_kernels._importance`)."""
    score = torch.where(score == 0, torch.zeros_like(score), score)
    keys = score.contiguous().view(torch.int32)
    return torch.where(torch.isnan(score), torch.full_like(keys, NAN_KEY), keys)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive scores along dim 1; bool [out, in].

    Ties follow a stable ascending sort: among equal scores the lower column is pruned first.
    """
    out_features, in_features = score.shape
    groups = score.reshape(out_features, in_features // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.reshape(out_features, in_features)


def non_finite_units(score: torch.Tensor, width: Optional[int]) -> Optional[torch.Tensor]:
    """bool [out, in], True over every unit holding a NaN/Inf score (a group of ``width``
    consecutive columns, or the whole row for None); None when every score is finite."""
    bad = ~torch.isfinite(score)
    if not bool(bad.any()):
        return None
    rows, cols = score.shape
    width = width or cols
    units = bad.reshape(rows, cols // width, width).any(dim=-1, keepdim=True)
    return units.expand(rows, cols // width, width).reshape(rows, cols)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(in * sparsity)`` lowest scores of every row (stable ties); bool [out, in]."""
    num_pruned = int(score.shape[1] * sparsity)
    order = torch.sort(score, dim=1, stable=True).indices
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, order[:, :num_pruned], False)
    return keep


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(numel * sparsity)`` lowest scores of the whole matrix, ties in row-major
    order; bool [out, in]."""
    flat = score.reshape(-1)
    num_pruned = int(flat.numel() * sparsity)
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:num_pruned]] = False
    return keep.reshape(score.shape)


def channel_sumsq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of every feature of ``x[..., C]`` over all leading dims, fp32 [C]."""
    x32 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    return (x32 * x32).sum(dim=0)


def wanda_loop_mask(weight, scaler_row, sparsity_ratio, prune_n, prune_m):
    """Wanda's original per-layer code path, written out as its prune loop runs it: the metric
    materialised, a per-group ``topk`` loop for N:M (``prune_n`` pruned of every ``prune_m``) or a
    per-row stable ``torch.sort`` + scatter. Returns bool [out, in], **True = pruned**. The
    baseline that :func:`copal_kernels.wanda_mask` replaces (tests and benchmarks)."""
    metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    pruned = torch.zeros_like(metric) == 1
    if prune_n != 0:
        for start in range(0, metric.shape[1], prune_m):
            window = metric[:, start:start + prune_m].float()
            lowest = torch.topk(window, prune_n, dim=1, largest=False)[1]
            pruned.scatter_(1, start + lowest, True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        pruned.scatter_(1, order[:, : int(metric.shape[1] * sparsity_ratio)], True)
    return pruned


def obs_block_(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    pruned: Optional[torch.Tensor],
    n: int = 0,
    m: int = 0,
):
    """SparseGPT's sequential OBS loop over one block of columns (Frantar & Alistarh 2023,
    Algorithm 1), the reference of :func:`copal_kernels.obs_block_`.

    ``W1`` fp32 [rows, B] is **mutated** into the pruned, updated block; ``Hinv1`` fp32 [B, B]
    is the block of the upper Cholesky factor of ``H^-1``. ``pruned`` (bool [rows, B], True =
    pruned, or None) is the mask; with ``n`` > 0, each N:M group (``n`` kept of ``m``) is chosen
    from the updated block at the group's first column: the lowest ``w^2 / [H^-1]_jj^2``, ties to
    the lower column, entries already in ``pruned`` scored 0 and kept pruned (llm-compressor's
    preserved mask). Returns (errors fp32 [rows, B], ``(w - q) / d`` of each column for the
    trailing update; losses fp32 [rows, B], ``(w - q)^2 / d^2``; the mask used, bool [rows, B])."""
    width = W1.shape[1]
    diag = torch.diag(Hinv1)
    errors = torch.zeros_like(W1)
    losses = torch.zeros_like(W1)
    pruned = torch.zeros_like(W1, dtype=torch.bool) if pruned is None else pruned.clone()
    for i in range(width):
        if n and i % m == 0:
            group = slice(i, i + m)
            score = W1[:, group] * W1[:, group] / (diag[None, group] * diag[None, group])
            score = torch.where(pruned[:, group], torch.zeros_like(score), score)
            pruned[:, group] |= ~nm_mask(score, n, m)
        w = W1[:, i].clone()
        d = Hinv1[i, i]
        q = torch.where(pruned[:, i], torch.zeros_like(w), w)
        diff = w - q
        losses[:, i] = diff * diff / (d * d)
        error = diff / d
        W1[:, i:] -= error[:, None] * Hinv1[i, i:][None, :]
        W1[:, i] = q
        errors[:, i] = error
    return errors, losses, pruned


def sparsegpt_loop_prune_(W, Hinv, sparsity, prune_n, prune_m, blocksize, mask=None,
                          block_local_mask=True):
    """The block loop of SparseGPT's ``fasterprune`` as llm-compressor's ``sparsify_weight``
    writes it (which, without ``mask``, is SparseGPT's own), from ``Hinv`` on, without
    quantisation: the baseline that :func:`copal_kernels.sparsegpt_prune_` replaces (tests and
    benchmarks). **Mutates** ``W`` fp32 [rows, cols]; ``prune_n`` pruned of every ``prune_m``;
    ``mask`` (True = pruned) is the preserved mask. Returns the per-row losses.

    ``block_local_mask``: llm-compressor's N:M path scores a group against
    ``mask[:, i:(i + prune_m)]`` with ``i`` the column *within the block*, so from the second
    block on it reads the first block's mask; False reads the group's own columns."""
    losses = torch.zeros(W.shape[0], device=W.device)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
                if int(W1.numel() * sparsity) > mask1.sum():
                    tmp = (~mask[:, i1:i2]) * W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
        else:
            mask1 = mask[:, i1:i2].clone() if mask is not None else torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i:(i + prune_m)] ** 2 / (torch.diag(Hinv1)[i:(i + prune_m)].reshape((1, -1))) ** 2
                if mask is not None:
                    j = i if block_local_mask else i1 + i
                    tmp = tmp * (~mask[:, j:(j + prune_m)])
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        losses += torch.sum(Losses1, 1) / 2
        if mask is not None:
            W[:, i2:] -= (~mask[:, i2:]) * Err1.matmul(Hinv[i1:i2, i2:])
        else:
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return losses
