"""COPAL's gradient pass: ``g[i] = sqrt(mean over tokens of (dL/dy_i)^2)`` for every prunable
Linear of the dense model, L the mean next-token cross-entropy on the calibration windows.

The device holds one block (and the next one's copy) and one chunk's activations; block inputs
wait on the host. Two knobs bound host memory, chosen by :func:`plan_gradient_pass`:

- rounds: the windows go ``micro_batch`` at a time; each round reads every block again;
- segments: a round's forward keeps the input of every ``segment``-th block only; the backward
  recomputes each segment's inner inputs from its first one, then goes back through it block by
  block (``segment = 1``: every input kept, no extra forward).

A round keeps ``(ceil(B / segment) + segment) x micro_batch`` window-sized block inputs
(``B / 1`` when ``segment = 1``) and reads ``2B`` blocks (``3B - ceil(B / segment)`` with
segments). The plan takes the fewest block reads that fit the host budget.
"""

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import copal_kernels as ck

from . import distributed
from .model import LayeredModel
from .phases import phase, progress
from .sweep import (BlockStates, embed_windows, park, release_pinned_cache, resolve_batch_size,
                    run_blocks, stream_blocks)


@dataclass(frozen=True)
class GradientPlan:
    """How the gradient pass walks ``windows`` windows through ``blocks`` blocks."""

    blocks: int
    windows: int
    micro_batch: int
    segment: int

    @property
    def rounds(self) -> int:
        return math.ceil(self.windows / self.micro_batch)

    @property
    def kept_inputs(self) -> int:
        """Window-sized block inputs held at once on the host: per window of a round."""
        if self.segment == 1:
            return self.blocks
        return math.ceil(self.blocks / self.segment) + self.segment

    @property
    def block_reads(self) -> int:
        """Blocks loaded onto the device over the whole pass."""
        per_round = 2 * self.blocks
        if self.segment > 1:
            per_round += self.blocks - math.ceil(self.blocks / self.segment)
        return self.rounds * per_round


def host_budget_bytes() -> int:
    """Default host budget for the stored block inputs: a quarter of physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def window_input_bytes(lm: LayeredModel, seq_len: int) -> int:
    """Bytes of one block input for one window."""
    return seq_len * lm.config.hidden_size * torch.empty((), dtype=lm.dtype).element_size()


def plan_gradient_pass(blocks: int, windows: int, window_bytes: int,
                       budget_bytes: Optional[int] = None) -> GradientPlan:
    """The plan with the fewest block reads whose kept inputs fit ``budget_bytes`` (ties: the
    one with less recomputation). At least one window per round, even over budget."""
    budget = host_budget_bytes() if budget_bytes is None else budget_bytes
    best = None
    for segment in range(1, blocks + 1):
        probe = GradientPlan(blocks, windows, 1, segment)
        micro_batch = max(1, min(windows, budget // (probe.kept_inputs * window_bytes)))
        plan = GradientPlan(blocks, windows, micro_batch, segment)
        key = (plan.block_reads, plan.kept_inputs * plan.micro_batch, segment)
        if best is None or key < best[0]:
            best = (key, plan)
    return best[1]


def gradient_norms(lm: LayeredModel, windows: torch.Tensor, *, device="cpu", batch_size="auto",
                   micro_batch: Optional[int] = None, segment: Optional[int] = None,
                   host_budget: Optional[int] = None, block_states: BlockStates = None,
                   timer=None, desc: str = "gradients") -> Dict[str, torch.Tensor]:
    """{"<block>.<layer>": fp32 [out]} on the host, from token windows [N, S].

    ``micro_batch`` and ``segment`` default to :func:`plan_gradient_pass` for ``host_budget``
    bytes of kept block inputs (default a quarter of host memory); rounds hold whole chunks of
    ``batch_size`` windows (``micro_batch`` is rounded down to a multiple of it, at least one
    chunk). In a group of ranks (copal.distributed) each rank takes its share of the windows
    and the sums are reduced in the windows' order. The result does not depend
    on them (up to fp32 summation order across rounds): every round's loss is normalised by all
    N x (S - 1) predicted tokens.
    """
    batch_size = resolve_batch_size(batch_size, lm, windows.shape[1], device)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    tokens = windows.numel()
    windows = distributed.local_windows(windows, batch_size, "calibration windows")
    plan = plan_gradient_pass(lm.num_blocks, len(windows), window_input_bytes(lm, windows.shape[1]),
                              host_budget)
    # rounds of whole chunks: each chunk's gradients are the same however the rounds fall
    rounded = max(batch_size, (micro_batch or plan.micro_batch) // batch_size * batch_size)
    plan = GradientPlan(lm.num_blocks, len(windows), rounded, segment or plan.segment)
    sums: Dict[str, distributed.OrderedSum] = {}
    for number, start in enumerate(range(0, len(windows), plan.micro_batch)):
        label = desc if plan.rounds == 1 else f"{desc} round {number + 1}/{plan.rounds}"
        _round(lm, windows[start:start + plan.micro_batch], plan.segment, sums, predicted,
               device=device, batch_size=batch_size, block_states=block_states, timer=timer,
               desc=label)
    distributed.reduce_sums(sums.values())
    norms = {key: torch.sqrt(acc.value / tokens).cpu() for key, acc in sums.items()}
    if torch.device(device).type == "cuda":  # the kept inputs' pinned buffers: not for the sweep
        release_pinned_cache()
    return norms


def _backward_order(blocks: int, segment: int) -> List[tuple]:
    """(block, "recompute" | "backward") from the last segment to the first."""
    order = []
    for first in reversed(range(0, blocks, segment)):
        inner = range(first, min(first + segment, blocks))
        order += [(index, "recompute") for index in inner[:-1]]
        order += [(index, "backward") for index in reversed(inner)]
    return order


def _round(lm, windows, segment, sums, predicted, *, device, batch_size, block_states, timer, desc):
    """Forward and backward over ``windows``, adding sum (dL/dy)^2 per output channel to ``sums``."""
    with phase(timer, "gradient forward"):
        chunks = embed_windows(lm, windows, device, batch_size)
        targets = [ids[:, 1:].to(device) for ids in windows.split(batch_size)]
    offload = torch.device(device).type == "cuda"  # kept inputs wait in pinned host memory
    kept: Dict[int, list] = {}
    with torch.no_grad():
        blocks = stream_blocks(lm, range(lm.num_blocks), device, block_states, timer)
        for index, block in progress(blocks, total=lm.num_blocks, desc=f"{desc} (forward)",
                                 unit="block"):
            with phase(timer, "gradient forward"):
                if index % segment == 0:
                    kept[index] = [park(h, offload) for h in chunks]
                chunks = run_blocks(lm, block, chunks, device)
            lm.unload_block(index)

    with phase(timer, "gradient backward"):
        grads = []
        lm.norm.to(device)
        lm.head.to(device)
        for hidden, target in zip(chunks, targets):
            hidden = hidden.detach().requires_grad_(True)
            logits = lm.logits(hidden)[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   reduction="sum") / predicted
            (grad,) = torch.autograd.grad(loss, hidden)
            grads.append(grad)
        del chunks

    order = _backward_order(lm.num_blocks, segment)
    blocks = stream_blocks(lm, [index for index, _ in order], device, block_states, timer)
    for (index, block), (_, role) in progress(zip(blocks, order), total=len(order),
                                          desc=f"{desc} (backward)", unit="block"):
        if role == "recompute":  # the next block's input, from this one's
            with phase(timer, "gradient recompute"), torch.no_grad():
                outputs = run_blocks(lm, block, kept[index], device)
                kept[index + 1] = [park(h, offload) for h in outputs]
        else:
            with phase(timer, "gradient backward"):
                _backward_block(lm, block, index, kept.pop(index), grads, sums, device)
        lm.unload_block(index)


def _backward_block(lm, block, index, inputs, grads, sums, device):
    """Recompute ``block`` from its stored ``inputs`` and turn ``grads`` (dL/d output, per chunk)
    into dL/d input in place, adding each Linear's squared output gradients to ``sums``."""
    linears = lm.linears(block)
    for name, linear in linears.items():
        sums.setdefault(f"{index}.{name}", distributed.OrderedSum(linear.out_features, device))
    handles = [linear.register_forward_hook(_capture(sums[f"{index}.{name}"]))
               for name, linear in linears.items()]
    try:
        for j, stored in enumerate(inputs):
            x = stored.to(device, non_blocking=True).requires_grad_(True)
            with torch.enable_grad():
                out = lm.run_block(block, x, lm.block_context(x))
                (grads[j],) = torch.autograd.grad(out, x, grads[j])
    finally:
        for handle in handles:
            handle.remove()


def _capture(acc: distributed.OrderedSum):
    """A forward hook whose output hook adds the squared output gradient per channel to ``acc``
    (one partial per chunk)."""
    def accumulate(grad):
        acc.add(ck.channel_sumsq_(torch.zeros_like(acc.value), grad.detach()))

    def hook(module, args, output):
        output.register_hook(accumulate)
    return hook
