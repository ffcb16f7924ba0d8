"""COPAL's gradient pass: ``g[i] = sqrt(mean over tokens of (dL/dy_i)^2)`` for every prunable
Linear of the dense model, L the mean next-token cross-entropy on the calibration windows.

Forward block by block keeping each block's inputs, then backward block by block, recomputing
each block from its stored input; the device holds one block and one chunk's activations.
"""

from typing import Dict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import copal_kernels as ck

from .model import LayeredModel
from .sweep import BlockStates, embed_windows, run_blocks


def gradient_norms(lm: LayeredModel, windows: torch.Tensor, *, device="cpu", batch_size: int = 8,
                   block_states: BlockStates = None, desc: str = "gradients") -> Dict[str, torch.Tensor]:
    """{"<block>.<layer>": fp32 [out]} on the host."""
    chunks = embed_windows(lm, windows, device, batch_size)
    targets = [ids[:, 1:].to(device) for ids in windows.split(batch_size)]
    predicted = sum(t.numel() for t in targets)
    tokens = windows.numel()
    inputs = []
    with torch.no_grad():
        for index in tqdm(range(lm.num_blocks), desc=f"{desc} (forward)", unit="block", leave=False):
            block = lm.load_block(index, device, block_states(index) if block_states else None)
            inputs.append([h.cpu() for h in chunks])
            chunks = run_blocks(lm, block, chunks, device)
            lm.unload_block(index)

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

    norms = {}
    for index in tqdm(reversed(range(lm.num_blocks)), total=lm.num_blocks,
                      desc=f"{desc} (backward)", unit="block", leave=False):
        block = lm.load_block(index, device, block_states(index) if block_states else None)
        linears = lm.linears(block)
        sums = {name: torch.zeros(linear.out_features, device=device) for name, linear in linears.items()}

        def capture(acc):
            def accumulate(grad):
                ck.channel_sumsq_(acc, grad.detach())

            def hook(module, args, output):
                output.register_hook(accumulate)
            return hook

        handles = [linear.register_forward_hook(capture(sums[name])) for name, linear in linears.items()]
        try:
            for j, stored in enumerate(inputs[index]):
                x = stored.to(device).requires_grad_(True)
                with torch.enable_grad():
                    out = lm.run_block(block, x, lm.block_context(x))
                    (grads[j],) = torch.autograd.grad(out, x, grads[j])
        finally:
            for handle in handles:
                handle.remove()
        for name, acc in sums.items():
            norms[f"{index}.{name}"] = torch.sqrt(acc / tokens).cpu()
        inputs[index] = None
        lm.unload_block(index)
    return norms
