"""Input checks shared by the public functions: bad input gets a clear error, never a wrong mask."""

from typing import Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VECTOR_DTYPES = FLOAT_DTYPES + (torch.float64,)
# how the steps' terms combine; the kernels take the index (0, 1, 2) as a constexpr
AGGREGATIONS = ("sum", "max", "sumsq")


def check_data(tensor: torch.Tensor, name: str) -> None:
    """A meta tensor has a shape but no values: nothing can be ranked or summed from it."""
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values): load its "
                         "values first")


def check_weight(weight: torch.Tensor, *, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(weight.shape)}")
    check_data(weight, name)


def non_finite_error(weight: torch.Tensor, where: str) -> ValueError:
    """The error for an importance score that is NaN or Inf (found by a kernel's flag or by the
    reference): non-finite weights, or finite inputs whose score overflows fp32."""
    if not bool(torch.isfinite(weight).all()):
        return ValueError(f"weight contains NaN or Inf{where}")
    return ValueError(
        f"the importance score overflows fp32 (|weight| up to {float(weight.abs().max()):.3g}; "
        f"the product with the norms, squared for sumsq, exceeds {torch.finfo(torch.float32).max:.3g}"
        f"){where}: scale the weight or the norms down, or pass check_finite=False to rank the "
        "Inf and NaN scores as torch.sort does (NaN above Inf above every finite score)"
    )


def _as_steps(vectors: Optional[torch.Tensor], length: int, weight: torch.Tensor, name: str, axis: str):
    """Return ``vectors`` as a contiguous fp32 [T, length] tensor (a 1-D vector is one step)."""
    if vectors is None:
        return None
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(vectors).__name__}")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[1] != length:
        raise ValueError(
            f"{name} must be [T, {axis}] = [T, {length}] for weight of shape {tuple(weight.shape)}, "
            f"got {tuple(vectors.shape)}"
        )
    if vectors.device != weight.device:
        raise ValueError(f"{name} is on {vectors.device} but weight is on {weight.device}")
    if vectors.dtype not in VECTOR_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {vectors.dtype}")
    vectors = vectors.to(torch.float32).contiguous()
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if bool((vectors < 0).any()):
        raise ValueError(f"{name} must be non-negative (they are norms)")
    return vectors


def check_importance_inputs(
    weight: torch.Tensor,
    grad_norms: Optional[torch.Tensor],
    act_norms: Optional[torch.Tensor],
    aggregation: str,
    step_weights: Optional[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """Validate the importance inputs; return fp32 contiguous (G, A, lambda) and the step count T.
    Finite vectors are required here; the scores' finiteness is checked where they are formed."""
    check_weight(weight)
    out_features, in_features = weight.shape
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    grads = _as_steps(grad_norms, out_features, weight, "grad_norms", "out")
    acts = _as_steps(act_norms, in_features, weight, "act_norms", "in")
    if grads is not None and acts is not None and grads.shape[0] != acts.shape[0]:
        raise ValueError(
            f"grad_norms has {grads.shape[0]} steps but act_norms has {acts.shape[0]}"
        )
    steps = grads.shape[0] if grads is not None else (acts.shape[0] if acts is not None else 0)
    lambdas = None
    if step_weights is not None:
        if steps == 0:
            raise ValueError("step_weights given but there are no steps (no grad_norms or act_norms)")
        if not isinstance(step_weights, torch.Tensor) or tuple(step_weights.shape) != (steps,):
            shape = tuple(step_weights.shape) if isinstance(step_weights, torch.Tensor) else step_weights
            raise ValueError(f"step_weights must be [T] = [{steps}], got {shape}")
        lambdas = _as_steps(step_weights, steps, weight, "step_weights", "T")[0]
    return grads, acts, lambdas, steps


def check_nm(in_features: int, n: int, m: int) -> None:
    for value, label in ((n, "n"), (m, "m")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{label} must be an int, got {value!r}")
    if not 1 <= m <= 32:
        raise ValueError(f"N:M needs 1 <= M <= 32, got M={m}")
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= N < M (N counts kept weights), got {n}:{m}")
    if in_features % m != 0:
        raise ValueError(
            f"N:M {n}:{m} needs in_features divisible by M={m}, got in_features={in_features}"
        )


def check_pruned_of(prune_n, prune_m, source: str) -> None:
    """N:M in the convention of Wanda, SparseGPT and llm-compressor (``prune_n`` weights
    **pruned** of every ``prune_m``; 0 = unstructured), with errors in their words."""
    for value, label in ((prune_n, "prune_n"), (prune_m, "prune_m")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{label} must be an int, got {value!r}")
    if prune_n != 0 and not 1 <= prune_n < prune_m <= 32:
        raise ValueError(f"prune_n={prune_n}, prune_m={prune_m}: {source}'s N:M prunes prune_n of "
                         "every prune_m consecutive weights and needs 1 <= prune_n < prune_m <= 32 "
                         "(2:4 is prune_n=2, prune_m=4), or prune_n=0 for unstructured")


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number, got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
