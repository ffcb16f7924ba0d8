"""The block sweep: calibration windows -> embeddings -> for each block: load, observe, prune,
propagate, release. The device holds one block plus the calibration activations."""

from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .methods import Method, Pattern
from .model import LayeredModel

BlockStates = Optional[Callable[[int], Optional[Dict[str, torch.Tensor]]]]


def _keep(hidden: torch.Tensor, offload: bool) -> torch.Tensor:
    """Where activations wait between blocks: on the device, or in (pinned) host memory."""
    if not offload or hidden.device.type == "cpu":
        return hidden
    host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
    return host.copy_(hidden, non_blocking=True)


def embed_windows(lm: LayeredModel, windows: torch.Tensor, device, batch_size: int,
                  offload: bool = False) -> List[torch.Tensor]:
    """Token windows [N, S] -> list of hidden-state chunks [<=batch_size, S, H], kept on
    ``device`` or, with ``offload``, in pinned host memory."""
    with torch.no_grad():
        lm.embed.to(device)
        return [_keep(lm.embed_tokens(ids.to(device)), offload) for ids in windows.split(batch_size)]


def run_blocks(lm: LayeredModel, block, chunks: List[torch.Tensor], device,
               offload: bool = False) -> List[torch.Tensor]:
    """Every chunk through ``block`` on ``device``; the outputs wait where the inputs did."""
    outputs = []
    for hidden in chunks:
        hidden = hidden.to(device, non_blocking=True)
        outputs.append(_keep(lm.run_block(block, hidden, lm.block_context(hidden)), offload))
    return outputs


def prune_sweep(lm: LayeredModel, windows: torch.Tensor, method: Method, pattern: Pattern, *,
                device="cpu", batch_size: int = 8, block_states: BlockStates = None,
                on_block_done: Optional[Callable[[int, torch.nn.Module], None]] = None,
                offload_activations: bool = False, desc: str = "prune") -> None:
    """Prune every block of ``lm`` in place with ``method``.

    ``block_states(i)`` gives the weights to start block i from (the dense W0 for restart,
    joint and COPAL) or None (the block as it is: cascade, or a lazy checkpoint's own weights).
    ``on_block_done(i, block)`` sees each finished block before it leaves the device (to write
    it to an output checkpoint). ``offload_activations`` keeps the calibration activations in
    pinned host memory between blocks, moving one chunk at a time to the device.
    """
    if len(windows) == 0:
        raise ValueError("no calibration windows: the dataset is empty")
    observes = method.needs_acts or method.needs_gram
    chunks = embed_windows(lm, windows, device, batch_size, offload_activations) if observes else []
    for index in tqdm(range(lm.num_blocks), desc=desc, unit="block", leave=False):
        block = lm.load_block(index, device, block_states(index) if block_states else None)
        linears = lm.linears(block)
        for name, linear in linears.items():
            pattern.check_layer(f"block {index} {name}", linear.in_features)
        with torch.no_grad():
            with method.observe(linears) as stats:
                run_blocks(lm, block, chunks, device, offload_activations)
            method.prune_block(index, linears, stats, pattern)
            if observes and index + 1 < lm.num_blocks:  # the next block's inputs
                chunks = run_blocks(lm, block, chunks, device, offload_activations)
        if on_block_done is not None:
            on_block_done(index, block)
        lm.unload_block(index)
