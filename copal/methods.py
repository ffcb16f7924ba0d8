"""Pruning methods: what each observes during the calibration forward, and how it prunes a block.

A method is a small object with two verbs used by the sweep, which knows no method by name:
``observe`` (a context manager that hooks a block's Linear layers and accumulates statistics)
and ``prune_block`` (turn the statistics into masks through copal_kernels and apply them).
"""

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import copal_kernels as ck
from copal_kernels.obs import MAX_BLOCK_COLUMNS

from .distributed import OrderedSum, reduce_sums, sum_ints
from .hessian import WEIGHTINGS


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` with ``sparsity``, or ``nm`` keeping ``n`` of every ``m``."""

    kind: str
    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """``"50%"``, ``"0.5"`` (unstructured) or ``"2:4"``, ``"4:8"`` (N:M, N kept)."""
        text = str(text).strip()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not 1 <= n < m:
                raise ValueError(f"pattern {text!r}: N:M needs 1 <= N < M")
            return cls("nm", sparsity=1 - n / m, n=n, m=m)
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"pattern {text!r}: expected e.g. 50%, 0.5, 2:4 or 4:8") from None
        if not 0 <= value < 1:
            raise ValueError(f"pattern {text!r}: sparsity must be in [0, 1)")
        return cls("unstructured", sparsity=value)

    def __str__(self) -> str:
        """For people: ``2:4``, ``50%``, ``62.5%`` (six significant digits)."""
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.sparsity * 100:g}%"

    @property
    def exact(self) -> str:
        """For files: ``2:4`` or the sparsity's shortest exact decimal (``0.625``), which
        :meth:`parse` turns back into the same pattern bit for bit."""
        return f"{self.n}:{self.m}" if self.kind == "nm" else repr(self.sparsity)

    def check_layer(self, name: str, in_features: int) -> None:
        if self.kind == "nm" and in_features % self.m:
            raise ValueError(f"pattern {self} does not divide layer {name}: in_features="
                             f"{in_features} is not a multiple of {self.m}")


class LayerStats:
    """What a calibration forward leaves per Linear: input sum of squares, token and sample
    counts, and (if asked) the Gram matrix ``sum x x^T`` for SparseGPT and COPAL's OBS update.

    Each sum is a :class:`copal.distributed.OrderedSum` of one partial per window (the sum of
    squares) or per chunk (the Gram matrix), so a group of ranks gets the same bits as one
    process; :func:`reduce_stats` completes them. Linears that read the same input tensor
    (q/k/v, gate/up) share one Gram matrix: the first of them (``gram_owner`` None) accumulates
    it, the others hold the same sum (``gram_owner``: the first one's name)."""

    def __init__(self, linear: nn.Linear, gram: bool):
        device = linear.weight.device
        self.act = OrderedSum(linear.in_features, device)
        self.gram_sum = OrderedSum((linear.in_features,) * 2, device) if gram else None
        self.gram_owner: Optional[str] = None
        self.tokens = 0
        self.samples = 0

    @property
    def act_sumsq(self) -> torch.Tensor:
        return self.act.value

    @property
    def gram(self) -> Optional[torch.Tensor]:
        return self.gram_sum.value if self.gram_sum is not None else None

    def add(self, x: torch.Tensor) -> None:
        # one window at a time: the sums do not depend on how windows are chunked, so masks
        # match a per-sample loop's bit for bit (benchmarks/cpu_wanda_protocol.py)
        for window in (x if x.dim() == 3 else [x]):
            self.act.add(ck.channel_sumsq_(torch.zeros_like(self.act.value), window))
        self.tokens += x.numel() // x.shape[-1]
        self.samples += x.shape[0] if x.dim() == 3 else 1
        if self.gram_sum is not None and self.gram_owner is None:
            flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
            self.gram_sum.add(flat.t() @ flat)


def reduce_stats(stats: Dict[str, LayerStats]) -> None:
    """Complete a block's statistics over every rank (copal.distributed): the sums in the
    windows' global order, the counts exactly. Nothing to do for a single process."""
    entries = list(stats.values())
    reduce_sums([entry.act for entry in entries])
    reduce_sums([entry.gram_sum for entry in entries
                 if entry.gram_sum is not None and entry.gram_owner is None])
    counts = sum_ints([value for entry in entries for value in (entry.tokens, entry.samples)])
    for entry, tokens, samples in zip(entries, counts[::2], counts[1::2]):
        entry.tokens, entry.samples = tokens, samples


class Method:
    name = "base"
    needs_gram = False
    needs_acts = True
    dense_inputs = False  # the sweep feeds the next block the dense block's outputs, not the pruned one's

    @contextlib.contextmanager
    def observe(self, linears: Dict[str, nn.Linear], experts: Dict[str, Optional[str]] = {}):
        """Hook ``linears``; yields {name: LayerStats} filled by every forward inside. Which
        Linears share an input is seen on the first forward: a Linear whose input is the very
        tensor the previous hooked Linear read shares that one's Gram matrix. An expert's
        Linears (``experts``: {name: the Linear whose input it reads too, or None}; see
        LayeredModel.expert_layers) share as the structure says, since an expert that no token
        reaches in a step shows nothing, and the second-order state's inputs must not change
        from step to step."""
        stats = {name: LayerStats(linear, self.needs_gram) for name, linear in linears.items()}
        for name, owner in experts.items():
            if owner is not None and self.needs_gram:
                stats[name].gram_sum, stats[name].gram_owner = stats[owner].gram_sum, owner
        handles = []
        previous = {"input": None, "name": None}
        seen = set()

        def hook(module, args, name):
            x, entry = args[0], stats[name]
            if entry.gram_sum is not None and name not in seen:
                seen.add(name)
                if x is previous["input"] and name not in experts and previous["name"] not in experts:
                    owner = stats[previous["name"]].gram_owner or previous["name"]
                    entry.gram_sum, entry.gram_owner = stats[owner].gram_sum, owner
            previous.update(input=x, name=name)
            entry.add(x.detach())

        if self.needs_acts or self.needs_gram:
            for name, linear in linears.items():
                handles.append(linear.register_forward_pre_hook(
                    lambda module, args, name=name: hook(module, args, name)))
        try:
            yield stats
        finally:
            previous.clear()
            for handle in handles:
                handle.remove()

    def prune_block(self, block_index: int, linears: Dict[str, nn.Linear],
                    stats: Dict[str, LayerStats], pattern: Pattern) -> None:
        raise NotImplementedError


def unseen_layers(stats: Dict[str, LayerStats]) -> List[str]:
    """The layers that no calibration token reached (experts the router never chose)."""
    return [name for name, entry in stats.items() if entry.tokens == 0]


@contextlib.contextmanager
def naming_layer(block_index: int, name: str):
    """Errors raised while pruning one layer name it (a NaN in block 17's down_proj is found
    there, not in a bare "weight contains NaN or Inf")."""
    try:
        yield
    except torch.linalg.LinAlgError as error:
        raise ValueError(f"block {block_index} {name}: the Hessian is not positive definite even "
                         f"with dampening (NaN or Inf in the calibration inputs?): {error}") from None
    except (ValueError, TypeError) as error:
        raise type(error)(f"block {block_index} {name}: {error}") from None


def _prune(weight: torch.Tensor, pattern: Pattern, grads=None, acts=None, group="row", **kw):
    if pattern.kind == "nm":
        ck.nm_prune_(weight, grads, acts, n=pattern.n, m=pattern.m, **kw)
    else:
        ck.unstructured_prune_(weight, grads, acts, sparsity=pattern.sparsity, group=group, **kw)


class Magnitude(Method):
    """|W|; one threshold per layer for unstructured, per-row groups for N:M."""

    name = "magnitude"
    needs_acts = False

    def prune_block(self, block_index, linears, stats, pattern):
        for name, linear in linears.items():
            with naming_layer(block_index, name):
                _prune(linear.weight.data, pattern, group="layer")


class Wanda(Method):
    """|W| * sqrt(scaler_row), scaler_row = mean over samples of each sample's sum of x^2."""

    name = "wanda"

    def prune_block(self, block_index, linears, stats, pattern):
        for name, linear in linears.items():
            entry = stats[name]
            # no token reached it (an expert): no input norms, so |W| (docs/usage.md)
            acts = torch.sqrt(entry.act_sumsq / max(entry.samples, 1)) if entry.tokens else None
            with naming_layer(block_index, name):
                _prune(linear.weight.data, pattern, None, acts)


def check_obs_pattern(pattern: Pattern, block_size: int) -> None:
    """SparseGPT's N:M groups are taken every M columns of each OBS block, so the block size
    must be a multiple of M (ValueError, before any work)."""
    if not 1 <= block_size <= MAX_BLOCK_COLUMNS:
        raise ValueError(f"the OBS block size must be from 1 to {MAX_BLOCK_COLUMNS} columns (held "
                         f"on chip by copal_kernels.obs_block_), got {block_size}")
    if pattern.kind == "nm" and block_size % pattern.m:
        raise ValueError(f"the OBS block size {block_size} is not a multiple of M={pattern.m}: "
                         f"{pattern}'s groups of {pattern.m} columns would straddle OBS blocks")


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, block_size: int,
              dampening: float, layer: str = "") -> torch.Tensor:
    """SparseGPT's OBS pruning of one layer (Frantar & Alistarh 2023, Algorithm 1): the mask
    chosen per block of ``block_size`` columns (unstructured: the exact count of the lowest
    ``w^2 / [H^-1]_jj^2`` in the block) or per N:M group, each pruned weight's error spread over
    the columns not yet visited through the Cholesky factor of ``H^-1``.

    weight: [out, in] (any float dtype; computed in fp32, returned in the weight's dtype).
    hessian: fp32 [in, in], ``2 X X^T / n`` (not modified). Dampening adds ``dampening x
    mean(diag H)`` to the diagonal; a Cholesky failure retries with ten times more, up to
    three times, and says so (a warning naming ``layer``); then raises LinAlgError."""
    check_obs_pattern(pattern, block_size)
    W = weight.to(torch.float32).clone()
    H = hessian.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    mean_diagonal = torch.mean(torch.diag(H))
    for attempt in range(4):
        damped = H + dampening * mean_diagonal * torch.eye(columns, device=H.device)
        try:
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)),
                                         upper=True)
            break
        except torch.linalg.LinAlgError:
            if attempt == 3:
                raise
            warnings.warn(f"{layer}: the Cholesky factorisation failed with dampening "
                          f"{dampening:g}; retrying with {dampening * 10:g}")
            dampening *= 10
    # the block loop, each block's column loop one fused kernel (copal_kernels.sparsegpt)
    if pattern.kind == "unstructured":
        ck.sparsegpt_prune_(W, Hinv, sparsity=pattern.sparsity, blocksize=block_size, rule="exact")
    else:
        ck.sparsegpt_prune_(W, Hinv, prune_n=pattern.m - pattern.n, prune_m=pattern.m,
                            blocksize=block_size)
    return W.to(weight.dtype)


def _obs_prune_layer(block_index: int, name: str, linear: nn.Linear, hessian: torch.Tensor,
                     pattern: Pattern, block_size: int, dampening: float) -> None:
    """Checks, then :func:`obs_prune` of ``linear`` in place; errors name the layer."""
    with naming_layer(block_index, name):
        if not bool(torch.isfinite(linear.weight.data).all()):
            raise ValueError("weight contains NaN or Inf")
        if not bool(torch.isfinite(hessian).all()):
            raise ValueError("the Hessian contains NaN or Inf (from the calibration inputs)")
        if not bool(hessian.any()):  # no token ever reached it (an expert): H = I, docs/usage.md
            hessian = torch.eye(hessian.shape[0], device=hessian.device)
        linear.weight.data.copy_(obs_prune(linear.weight.data, hessian, pattern,
                                           block_size=block_size, dampening=dampening,
                                           layer=f"block {block_index} {name}"))


class SparseGPT(Method):
    """OBS pruning with weight updates: H = 2 X X^T / n, 1% dampening, blocks of 128 columns,
    the mask chosen per block (unstructured, exact count) or per N:M group."""

    name = "sparsegpt"
    needs_gram = True
    needs_acts = False
    block_size = 128
    dampening = 0.01

    def prune_block(self, block_index, linears, stats, pattern):
        for name, linear in linears.items():
            hessian = stats[name].gram * (2.0 / max(stats[name].tokens, 1))
            _obs_prune_layer(block_index, name, linear, hessian, pattern, self.block_size,
                             self.dampening)


@dataclass
class LayerHistory:
    """COPAL's state of one layer: the normalised vectors of every step so far."""

    grads: List[torch.Tensor]  # ga_t, fp32 [out]
    acts: List[torch.Tensor]  # aa_t, fp32 [in]


NORMALISATIONS = ("mean", "none")  # ga = g / mean(g) (METHOD.md), or the raw norms


def normalised(vector: torch.Tensor) -> torch.Tensor:
    mean = vector.mean()
    return vector / mean if float(mean) > 0 else torch.ones_like(vector)


GRADIENTS = ("lm", "none")  # COPAL's g_t: the gradient pass over the dense model, or g = 1

# COPAL's default variant, chosen by the ablations on the standard protocol (docs/results.md):
# the summed squares of the terms with raw norms and g = 1, i.e. Wanda's score on the union of all
# steps' data, from the state alone. METHOD.md's sum with the gradient pass and mean-normalised
# vectors, and the max that was the default before, missed the Wanda-joint oracle's final mean at
# 2:4 by 7%; this variant ends within 0.4% of it at 50%, 2:4 and 4:8, forgetting less than `max`.
DEFAULT_AGGREGATION = "sumsq"
DEFAULT_GRADIENT = "none"
DEFAULT_NORMALISATION = "none"


GROUPS = ("row", "layer")


WEIGHT_UPDATES = ("none", "obs")  # deploy W0 * M_t, or SparseGPT's OBS update of W0
STEP_WEIGHTINGS = WEIGHTINGS  # how the OBS update weighs past steps' Hessians (copal.hessian)
CALIBRATION_INPUTS = ("pruned", "dense")  # each block calibrated on the pruned or the dense model's inputs
OBS_DEFAULTS = dict(step_weighting="tokens", dampening=SparseGPT.dampening,
                    block_size=SparseGPT.block_size, calibration_inputs="pruned")  # SparseGPT's
MASK_DEFAULTS = dict(aggregation=DEFAULT_AGGREGATION, gradient=DEFAULT_GRADIENT,
                     normalisation=DEFAULT_NORMALISATION, group="row")


@dataclass(frozen=True)
class CopalOptions:
    """COPAL's options, one object from the CLI, the config and the API to the method, the state's
    metadata and the report (METHOD.md, "Importance update"; docs/reconstruction.md).

    weight_update: ``none`` deploys ``W0 * M_t`` with the mask from the importance below;
    ``obs`` prunes W0 with SparseGPT's OBS procedure on the Hessian accumulated over every step
    (copal.hessian), updating the kept weights. step_weights: lambda_s per step, a fixed list
    (one per dataset of the run), ``"linear"`` (lambda_s = s, the s-th step: recent steps weigh
    more, for any number of steps, so a state can be continued), or None (all 1); both variants
    honour it.

    Mask-only (``none``) options: aggregation, how the steps combine (``sum``: METHOD.md; ``max``;
    ``sumsq``: the sum of the squared terms); gradient, ``lm`` (METHOD.md's gradient pass over the
    dense model) or ``none`` (g = 1); normalisation, ``mean`` (each step's norms divided by their
    mean, METHOD.md) or ``none`` (raw); group, ``row`` or ``layer`` comparison groups
    (unstructured patterns only).

    OBS (``obs``) options: step_weighting, ``tokens`` (every calibration token alike: the
    Hessian of the union of the steps' data) or ``datasets`` (every step alike); dampening (a
    fraction of the mean diagonal, SparseGPT's 0.01) and block_size (columns per OBS block,
    SparseGPT's 128); calibration_inputs, ``pruned`` (each block's Gram from the outputs of the
    blocks below as pruned by this step: SparseGPT's sequential calibration) or ``dense`` (from
    the dense model's: every step's Gram is then what any later step would compute, so the
    state's Hessian is exactly the union's; docs/reconstruction.md).

    Every value is checked here, and an option of one variant set away from its default on the
    other is refused; :meth:`check_pattern` refuses what a pattern cannot honour.
    """

    aggregation: str = DEFAULT_AGGREGATION
    gradient: str = DEFAULT_GRADIENT
    normalisation: str = DEFAULT_NORMALISATION
    group: str = "row"
    step_weights: Optional[Tuple[float, ...]] = None
    weight_update: str = "none"
    step_weighting: str = OBS_DEFAULTS["step_weighting"]
    dampening: float = OBS_DEFAULTS["dampening"]
    block_size: int = OBS_DEFAULTS["block_size"]
    calibration_inputs: str = OBS_DEFAULTS["calibration_inputs"]

    def __post_init__(self):
        for key, allowed in (("aggregation", ck.AGGREGATIONS), ("gradient", GRADIENTS),
                             ("normalisation", NORMALISATIONS), ("group", GROUPS),
                             ("weight_update", WEIGHT_UPDATES), ("step_weighting", STEP_WEIGHTINGS),
                             ("calibration_inputs", CALIBRATION_INPUTS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"COPAL {key} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, key)!r}")
        if self.step_weights is not None and self.step_weights != "linear":
            try:
                weights = tuple(float(w) for w in self.step_weights)
            except (TypeError, ValueError):
                raise ValueError(f"COPAL step_weights must be a list of numbers, got "
                                 f"{self.step_weights!r}") from None
            if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"COPAL step_weights must be positive finite numbers, one per "
                                 f"step, got {list(self.step_weights)}")
            object.__setattr__(self, "step_weights", weights)
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)) \
                or not 0 < self.dampening < 1e3:
            raise ValueError(f"COPAL dampening must be a positive number below 1000, got "
                             f"{self.dampening!r}")
        object.__setattr__(self, "dampening", float(self.dampening))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size < 1:
            raise ValueError(f"COPAL block_size must be a positive integer, got {self.block_size!r}")
        unused = OBS_DEFAULTS if self.weight_update == "none" else MASK_DEFAULTS
        changed = [key for key, default in unused.items() if getattr(self, key) != default]
        if changed:
            raise ValueError(
                f"COPAL {', '.join(changed)} do(es) not apply with weight_update "
                f"{self.weight_update!r}: " + ("the OBS update takes its mask from the OBS "
                                               "saliency" if self.weight_update == "obs" else
                                               "they are options of the OBS update"))

    FIELDS = ("aggregation", "gradient", "normalisation", "group", "step_weights",
              "weight_update", "step_weighting", "dampening", "block_size", "calibration_inputs")

    @classmethod
    def from_dict(cls, data: dict) -> "CopalOptions":
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise ValueError(f"unknown COPAL option(s): {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        data = {key: getattr(self, key) for key in self.FIELDS}
        data["step_weights"] = list(self.step_weights) if self.fixed_step_weights else \
            self.step_weights
        return data

    @property
    def obs(self) -> bool:
        return self.weight_update == "obs"

    def check_pattern(self, pattern: Pattern) -> None:
        if self.obs:
            check_obs_pattern(pattern, self.block_size)
        if self.group == "layer" and pattern.kind == "nm":
            raise ValueError(f"COPAL group 'layer' applies to unstructured patterns; an N:M "
                             f"pattern ({pattern}) chooses within each group of {pattern.m}")

    @property
    def fixed_step_weights(self) -> bool:
        """A list of step weights, which needs every step's weight up front."""
        return isinstance(self.step_weights, tuple)

    def step_weight(self, step: int) -> float:
        """lambda_s of step ``step`` (1-based)."""
        if self.step_weights is None:
            return 1.0
        return float(step) if self.step_weights == "linear" else self.step_weights[step - 1]

    def check_steps(self, steps: int) -> None:
        """Fixed step weights must name one weight per step of the run."""
        if self.fixed_step_weights and len(self.step_weights) != steps:
            raise ValueError(f"COPAL step_weights has {len(self.step_weights)} weight(s) for "
                             f"{steps} step(s)")

    @property
    def label(self) -> str:
        lambdas = f",lambda={list(self.step_weights)}" if self.fixed_step_weights else (
            ",lambda=linear" if self.step_weights else "")
        if self.obs:
            text = f"[obs,{self.step_weighting}{lambdas}"
            text += f",damp={self.dampening:g}" if self.dampening != OBS_DEFAULTS["dampening"] else ""
            text += f",block={self.block_size}" if self.block_size != OBS_DEFAULTS["block_size"] else ""
            text += ",dense-inputs" if self.calibration_inputs == "dense" else ""
            return text + "]"
        text = f"[{self.aggregation},{'grad' if self.gradient == 'lm' else 'nograd'}{lambdas}"
        text += ",raw" if self.normalisation == "none" else ""
        return text + (",layer-group]" if self.group == "layer" else "]")


class Copal(Method):
    """COPAL (METHOD.md): I_t = agg_s lambda_s |W0| ga_s[i] aa_s[j] (agg: METHOD.md's ``sum``,
    ``max``, or ``sumsq``, the sum of the squared terms); masks from W0 each step. With
    ``options.weight_update == "obs"``: SparseGPT's OBS pruning of W0 on the Hessian of every
    step so far, from ``hessians`` (:class:`copal.hessian.HessianState`, docs/reconstruction.md).

    ``history`` is the mask-only state ({block.layer: LayerHistory}); the sweep's step appends
    this step's vectors and prunes the dense weights with all steps so far. ``grad_norms``
    holds this step's g_t per layer (from the gradient pass) or is None (``gradient="none"``).
    """

    name = "copal"

    def __init__(self, history: Dict[str, LayerHistory],
                 grad_norms: Optional[Dict[str, torch.Tensor]],
                 options: CopalOptions = CopalOptions(), hessians=None):
        if options.obs and hessians is None:
            raise ValueError("COPAL's OBS update needs its second-order state (hessians)")
        self.history = history
        self.grad_norms = grad_norms
        self.options = options
        self.hessians = hessians
        self.needs_gram = options.obs
        self.needs_acts = not options.obs
        self.dense_inputs = options.obs and options.calibration_inputs == "dense"

    def prune_block(self, block_index, linears, stats, pattern):
        if self.options.obs:
            return self._prune_obs(block_index, linears, stats, pattern)
        options = self.options
        for name, linear in linears.items():
            key = f"{block_index}.{name}"
            act_norms = torch.sqrt(stats[name].act_sumsq / max(stats[name].tokens, 1))
            if self.grad_norms is not None:
                grad = self.grad_norms[key].to(act_norms.device)
            else:
                grad = torch.ones(linear.out_features, device=act_norms.device)
            layer = self.history.setdefault(key, LayerHistory([], []))
            # a step whose tokens never reach the layer (an expert) adds no term (zeros)
            scale = (normalised if options.normalisation == "mean" else torch.Tensor.float) \
                if stats[name].tokens else torch.zeros_like
            layer.grads.append(scale(grad).cpu())
            layer.acts.append(scale(act_norms).cpu())
            device = linear.weight.device
            # no step has a non-zero term: never reached (an expert), or reached on the pruned
            # model but given no gradient on the dense one (routed otherwise there): |W|
            if not any(bool(g.any()) and bool(a.any()) for g, a in zip(layer.grads, layer.acts)):
                with naming_layer(block_index, name):
                    _prune(linear.weight.data, pattern, group=options.group)
                continue
            grads = torch.stack(layer.grads).to(device)
            acts = torch.stack(layer.acts).to(device)
            weights = None
            if options.step_weights is not None:
                weights = torch.tensor([options.step_weight(s + 1) for s in range(len(layer.grads))],
                                       device=device, dtype=torch.float32)
            with naming_layer(block_index, name):
                _prune(linear.weight.data, pattern, grads, acts, group=options.group,
                       aggregation=options.aggregation, step_weights=weights)

    def _prune_obs(self, block_index, linears, stats, pattern):
        groups: Dict[str, List[str]] = {}
        for name in linears:
            groups.setdefault(stats[name].gram_owner or name, []).append(name)
        grams = {owner: (stats[owner].gram, stats[owner].tokens) for owner in groups}
        hessians = self.hessians.update(block_index, grams, groups)
        for owner, names in groups.items():
            for name in names:
                _obs_prune_layer(block_index, name, linears[name], hessians[owner], pattern,
                                 self.options.block_size, self.options.dampening)


METHODS = ("magnitude", "wanda", "sparsegpt", "copal")


def make_method(name: str, **copal_arguments) -> Method:
    """A method by name; ``copal_arguments`` (COPAL only): ``history``, ``grad_norms``,
    ``options`` (:class:`CopalOptions`)."""
    if name == "magnitude":
        return Magnitude()
    if name == "wanda":
        return Wanda()
    if name == "sparsegpt":
        return SparseGPT()
    if name == "copal":
        return Copal(**copal_arguments)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
