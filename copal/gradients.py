"""COPAL's gradient pass: ``g[i] = sqrt(mean over tokens of (dL/dy_i)^2)`` for every prunable
Linear of the dense model, L the mean next-token cross-entropy on the calibration windows.

Forward block by block keeping each block's inputs, then backward block by block, recomputing
each block from its stored input; the device holds one block and one chunk's activations.
"""

import os
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import copal_kernels as ck

from .model import LayeredModel
from .phases import phase
from .sweep import BlockStates, park, embed_windows, run_blocks, stream_blocks


def stored_input_bytes(lm: LayeredModel, windows: torch.Tensor) -> int:
    """Host bytes one round of the gradient pass keeps: every block's input for ``windows``."""
    element = torch.empty((), dtype=lm.dtype).element_size()
    return lm.num_blocks * windows.numel() * lm.config.hidden_size * element


def auto_micro_batch(lm: LayeredModel, windows: torch.Tensor, host_budget_bytes: Optional[int] = None) -> int:
    """The most windows per round whose stored block inputs fit ``host_budget_bytes`` (default:
    a quarter of the host's physical memory); at least 1."""
    if host_budget_bytes is None:
        host_budget_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    per_window = stored_input_bytes(lm, windows[:1])
    return max(1, min(len(windows), host_budget_bytes // per_window))


def gradient_norms(lm: LayeredModel, windows: torch.Tensor, *, device="cpu", batch_size: int = 8,
                   micro_batch: Optional[int] = None, block_states: BlockStates = None,
                   timer=None, desc: str = "gradients") -> Dict[str, torch.Tensor]:
    """{"<block>.<layer>": fp32 [out]} on the host, from token windows [N, S].

    The windows go in rounds of ``micro_batch`` (default :func:`auto_micro_batch`): a round runs
    forward through every block keeping each block's input on the host, then backward block by
    block, recomputing each block from its stored input. Host memory is bounded by one round's
    stored inputs (:func:`stored_input_bytes`); each round reads every block twice. The result
    does not depend on ``micro_batch`` (up to fp32 summation order): the loss is normalised by
    all N x (S - 1) predicted tokens in every round.
    """
    micro_batch = micro_batch or auto_micro_batch(lm, windows)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    sums: Dict[str, torch.Tensor] = {}
    rounds = range(0, len(windows), micro_batch)
    for number, start in enumerate(rounds):
        label = desc if len(rounds) == 1 else f"{desc} round {number + 1}/{len(rounds)}"
        _round(lm, windows[start:start + micro_batch], sums, predicted, device=device,
               batch_size=batch_size, block_states=block_states, timer=timer, desc=label)
    return {key: torch.sqrt(acc / windows.numel()).cpu() for key, acc in sums.items()}


def _round(lm, windows, sums, predicted, *, device, batch_size, block_states, timer, desc):
    """Forward and backward over ``windows``, adding sum (dL/dy)^2 per output channel to ``sums``."""
    with phase(timer, "gradient forward"):
        chunks = embed_windows(lm, windows, device, batch_size)
        targets = [ids[:, 1:].to(device) for ids in windows.split(batch_size)]
    offload = torch.device(device).type == "cuda"  # stored inputs wait in pinned host memory
    inputs = []
    with torch.no_grad():
        blocks = stream_blocks(lm, range(lm.num_blocks), device, block_states, timer)
        for index, block in tqdm(blocks, total=lm.num_blocks, desc=f"{desc} (forward)",
                                 unit="block", leave=False):
            with phase(timer, "gradient forward"):
                inputs.append([park(h, offload) for h in chunks])
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

    blocks = stream_blocks(lm, reversed(range(lm.num_blocks)), device, block_states, timer)
    for index, block in tqdm(blocks, total=lm.num_blocks, desc=f"{desc} (backward)", unit="block",
                             leave=False):
        with phase(timer, "gradient backward"):
            linears = lm.linears(block)
            for name, linear in linears.items():
                sums.setdefault(f"{index}.{name}", torch.zeros(linear.out_features, device=device))
            handles = [linear.register_forward_hook(_capture(sums[f"{index}.{name}"]))
                       for name, linear in linears.items()]
            try:
                for j, stored in enumerate(inputs[index]):
                    x = stored.to(device, non_blocking=True).requires_grad_(True)
                    with torch.enable_grad():
                        out = lm.run_block(block, x, lm.block_context(x))
                        (grads[j],) = torch.autograd.grad(out, x, grads[j])
            finally:
                for handle in handles:
                    handle.remove()
            inputs[index] = None
        lm.unload_block(index)


def _capture(acc: torch.Tensor):
    """A forward hook whose output hook adds the squared output gradient per channel to ``acc``."""
    def accumulate(grad):
        ck.channel_sumsq_(acc, grad.detach())

    def hook(module, args, output):
        output.register_hook(accumulate)
    return hook
