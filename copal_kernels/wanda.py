"""Drop-in for the prune loop of Wanda-style code (Wanda, OWL, and their forks).

Wanda's ``prune_wanda`` builds, per layer::

    W_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:   # N:M, prune_n of every prune_m pruned, per-group topk(largest=False) loop
        ...
    else:              # per-row stable sort, the first int(in * sparsity_ratio) indices pruned
        ...
    W[W_mask] = 0

:func:`wanda_mask` returns that ``W_mask`` in one call, from the Triton kernels on a GPU.
"""

from typing import Optional

import torch

from ._validate import VECTOR_DTYPES, check_data, check_pruned_of, check_weight
from .nm import nm_mask
from .unstructured import unstructured_mask


def wanda_mask(
    W_metric: Optional[torch.Tensor] = None,
    *,
    weight: Optional[torch.Tensor] = None,
    scaler_row: Optional[torch.Tensor] = None,
    sparsity_ratio: float = 0.0,
    prune_n: int = 0,
    prune_m: int = 0,
    check_finite: bool = True,
    ties: str = "stable",
) -> torch.Tensor:
    """The ``W_mask`` that Wanda's loop builds: bool ``[out, in]``, **True = pruned** (Wanda's
    convention, the opposite of the other functions here).

    Give either ``W_metric`` (a non-negative float ``[out, in]``, e.g. Wanda's
    ``|W| * sqrt(scaler_row)``) or ``weight`` (``W[out, in]``, fp32/fp16/bf16) with ``scaler_row``
    (fp32 ``[in]``, Wanda's mean over samples of per-sample ``sum x^2``); the second form never
    materialises the metric.

    ``prune_n``, ``prune_m`` take **Wanda's N convention**: ``prune_n`` weights of every
    ``prune_m`` consecutive ones are *pruned* (2:4 sparsity is ``prune_n=2, prune_m=4``);
    ``prune_n == 0`` selects the unstructured per-row path with ``sparsity_ratio``.

    ``ties``: on exact ties of the metric, ``"stable"`` (the kernels, default) prunes the lower
    column first, which is Wanda's stable sort on the unstructured path, bit for bit. Wanda's
    N:M path calls ``torch.topk`` per group, whose order among equal values is torch's own (on
    SmolLM2 at 2:4 and 4:8, issue 19 reports 984 and 126 mask entries that differ from
    ``"stable"``; never a count).
    ``"topk"`` computes Wanda's metric and calls ``torch.topk`` over every group at once, as its
    loop does one group at a time: on the CPU builds tested (torch 2.13) the same masks as the
    loop on heavily tied inputs (tests/test_wanda.py); on a GPU it is whatever ``torch.topk``
    does there. It materialises the metric and runs in torch, not in the kernels.

    ``check_finite``: as in :func:`copal_kernels.nm_mask` (a NaN/Inf metric, or a product that
    overflows fp32, raises ``ValueError``; with ``False`` it is ranked as ``torch.sort`` ranks
    it). Nothing is mutated. Errors (``TypeError``/``ValueError``, before any work) use Wanda's
    argument names and convention. Wanda's ``--use_variant`` (a per-row threshold searched on
    the cumulative metric) is not covered: keep its own loop there.
    """
    if ties not in ("stable", "topk"):
        raise ValueError(f"ties must be 'stable' or 'topk' (Wanda's torch.topk order), got {ties!r}")
    if isinstance(sparsity_ratio, bool) or not isinstance(sparsity_ratio, (int, float)) \
            or not 0.0 <= float(sparsity_ratio) < 1.0:
        raise ValueError(f"sparsity_ratio must be a number in [0, 1), got {sparsity_ratio!r}")
    if (W_metric is None) == (weight is None):
        raise ValueError("give exactly one of W_metric or weight (with scaler_row)")
    check_pruned_of(prune_n, prune_m, "Wanda")
    if W_metric is not None:
        if scaler_row is not None:
            raise ValueError("scaler_row goes with weight, not with W_metric")
        check_weight(W_metric, name="W_metric")
        if bool((W_metric < 0).any()):
            raise ValueError("W_metric must be non-negative (Wanda's |W| * sqrt(scaler_row))")
        weight, act_norms = W_metric, None
    else:
        check_weight(weight)
        if not isinstance(scaler_row, torch.Tensor):
            raise ValueError("weight needs scaler_row (Wanda's per-input-channel statistic), "
                             f"a 1-D tensor [in]; got {type(scaler_row).__name__}")
        if scaler_row.dim() != 1:
            raise ValueError(f"scaler_row must be a 1-D tensor [in], got shape {tuple(scaler_row.shape)}")
        check_data(scaler_row, "scaler_row")
        if scaler_row.dtype not in VECTOR_DTYPES:
            raise TypeError(f"scaler_row must be float32, float64, float16 or bfloat16, got "
                            f"{scaler_row.dtype}")
        if bool((scaler_row < 0).any()) or not bool(torch.isfinite(scaler_row).all()):
            raise ValueError("scaler_row must be finite and non-negative")
        act_norms = torch.sqrt(scaler_row.to(torch.float32))
    if prune_n != 0 and weight.shape[1] % prune_m:
        raise ValueError(f"prune_n={prune_n}, prune_m={prune_m} needs the in-features divisible by "
                         f"prune_m, got {weight.shape[1]}")
    if prune_n != 0 and ties == "topk":
        return _topk_mask(weight if act_norms is None else torch.abs(weight) * torch.sqrt(
            scaler_row.reshape((1, -1))), prune_n, prune_m, check_finite)
    try:
        if prune_n != 0:
            return ~nm_mask(weight, None, act_norms, n=prune_m - prune_n, m=prune_m,
                            check_finite=check_finite)
        return ~unstructured_mask(weight, None, act_norms, sparsity=sparsity_ratio, group="row",
                                  check_finite=check_finite)
    except ValueError as error:
        if W_metric is not None and str(error).startswith("weight "):  # the caller's name
            raise ValueError("W_metric" + str(error)[len("weight"):]) from None
        raise


def _topk_mask(metric: torch.Tensor, prune_n: int, prune_m: int, check_finite: bool):
    """Wanda's N:M selection, ``torch.topk(tmp, prune_n, dim=1, largest=False)`` on each group's
    ``tmp = W_metric[:, ii:ii + prune_m].float()``, for every group in one call."""
    metric = metric.float()
    if check_finite and not bool(torch.isfinite(metric).all()):
        raise ValueError("W_metric contains NaN or Inf (pass check_finite=False to rank it "
                         "as torch.topk does)")
    groups = metric.reshape(metric.shape[0], -1, prune_m)
    lowest = torch.topk(groups, prune_n, dim=-1, largest=False)[1]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True).reshape(
        metric.shape)
