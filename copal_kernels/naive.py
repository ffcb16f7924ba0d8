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
) -> torch.Tensor:
    """Materialised importance, fp32 [out, in].

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
            term = term * act_norms[t][None, :]
        if grad_norms is not None:
            term = term * grad_norms[t][:, None]
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
