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
) -> torch.Tensor:
    """The ``W_mask`` that Wanda's loop builds: bool ``[out, in]``, **True = pruned** (Wanda's
    convention, the opposite of the other functions here).

    Give either ``W_metric`` (a non-negative float ``[out, in]``, e.g. Wanda's
    ``|W| * sqrt(scaler_row)``) or ``weight`` (``W[out, in]``, fp32/fp16/bf16) with ``scaler_row``
    (fp32 ``[in]``, Wanda's mean over samples of per-sample ``sum x^2``); the second form never
    materialises the metric.

    ``prune_n``, ``prune_m`` take **Wanda's N convention**: ``prune_n`` weights of every
    ``prune_m`` consecutive ones are *pruned* (2:4 sparsity is ``prune_n=2, prune_m=4``);
    ``prune_n == 0`` selects the unstructured per-row path with ``sparsity_ratio``. Ties are
    pruned lower column first: identical to Wanda's stable sort; its ``topk`` loop leaves ties
    to the implementation, so on exact ties the N:M masks may differ from it (never the counts).
    ``check_finite``: as in :func:`copal_kernels.nm_mask` (a NaN/Inf metric, or a product that
    overflows fp32, raises ``ValueError``; with ``False`` it is ranked as ``torch.sort`` ranks
    it). Nothing is mutated. Errors (``TypeError``/``ValueError``, before any work) use Wanda's
    argument names and convention.
    """
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
