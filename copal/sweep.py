"""The block sweep: calibration windows -> embeddings -> for each block: load, observe, prune,
propagate, release. The device holds one block plus the calibration activations."""

from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .methods import Method, Pattern
from .model import LayeredModel

BlockStates = Optional[Callable[[int], Optional[Dict[str, torch.Tensor]]]]


def embed_windows(lm: LayeredModel, windows: torch.Tensor, device, batch_size: int) -> List[torch.Tensor]:
    """Token windows [N, S] -> list of hidden-state chunks [<=batch_size, S, H] on ``device``."""
    with torch.no_grad():
        lm.embed.to(device)
        return [lm.embed_tokens(ids.to(device)) for ids in windows.split(batch_size)]


def run_blocks(lm: LayeredModel, block, chunks: List[torch.Tensor]) -> List[torch.Tensor]:
    return [lm.run_block(block, h, lm.block_context(h)) for h in chunks]


def prune_sweep(lm: LayeredModel, windows: torch.Tensor, method: Method, pattern: Pattern, *,
                device="cpu", batch_size: int = 8, block_states: BlockStates = None,
                on_block_done: Optional[Callable[[int, torch.nn.Module], None]] = None,
                desc: str = "prune") -> None:
    """Prune every block of ``lm`` in place with ``method``.

    ``block_states(i)`` gives the weights to start block i from (the dense W0 for restart,
    joint and COPAL) or None (the block as it is: cascade, or a lazy checkpoint's own weights).
    ``on_block_done(i, block)`` sees each finished block before it leaves the device (to write
    it to an output checkpoint).
    """
    if len(windows) == 0:
        raise ValueError("no calibration windows: the dataset is empty")
    chunks = embed_windows(lm, windows, device, batch_size)
    for index in tqdm(range(lm.num_blocks), desc=desc, unit="block", leave=False):
        block = lm.load_block(index, device, block_states(index) if block_states else None)
        linears = lm.linears(block)
        for name, linear in linears.items():
            pattern.check_layer(f"block {index} {name}", linear.in_features)
        with torch.no_grad():
            with method.observe(linears) as stats:
                if method.needs_acts or method.needs_gram:
                    run_blocks(lm, block, chunks)
            method.prune_block(index, linears, stats, pattern)
            chunks = run_blocks(lm, block, chunks)
        if on_block_done is not None:
            on_block_done(index, block)
        lm.unload_block(index)
