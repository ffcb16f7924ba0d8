"""Perplexity, streamed block by block like pruning, and the continual metrics of METHOD.md."""

import math
from typing import Dict, List

import torch
import torch.nn.functional as F

from . import distributed
from .model import LayeredModel
from .phases import progress
from .sweep import BlockStates, embed_windows, resolve_batch_size, run_blocks, stream_blocks


def perplexities(lm: LayeredModel, test_sets: Dict[str, torch.Tensor], *, device="cpu",
                 batch_size="auto", block_states: BlockStates = None,
                 offload_activations: bool = False, desc: str = "evaluate") -> Dict[str, float]:
    """exp(mean next-token NLL over all predicted tokens) of each set of windows [N, S]; all sets
    go through each block together, so every block is loaded once. A perplexity that is not a
    finite number (NaN or Inf logits) raises ValueError naming the set. In a group of ranks each
    runs its share of the windows; the per-window NLL sums are gathered and added in the
    windows' order, so every rank returns the single process's numbers."""
    names = list(test_sets)
    windows = torch.cat([test_sets[n] for n in names])
    batch_size = resolve_batch_size(batch_size, lm, windows.shape[1], device)
    owners = torch.cat([torch.full((len(test_sets[n]),), i) for i, n in enumerate(names)])
    local = distributed.local_windows(windows, batch_size, "test windows")
    chunks = embed_windows(lm, local, device, batch_size, offload_activations)
    with torch.no_grad():
        blocks = stream_blocks(lm, range(lm.num_blocks), device, block_states)
        for index, block in progress(blocks, total=lm.num_blocks, desc=desc, unit="block"):
            chunks = run_blocks(lm, block, chunks, device, offload_activations)
            lm.unload_block(index)
        lm.norm.to(device)
        lm.head.to(device)
        window_nll = []  # fp64, one sum per window, in the windows' order
        for hidden, ids in zip(chunks, local.split(batch_size)):
            logits = lm.logits(hidden.to(device))[:, :-1].float()
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                     ids[:, 1:].reshape(-1).to(device), reduction="none")
            window_nll.append(losses.reshape(len(ids), -1).double().sum(1).cpu())
    # every rank's windows, then one sum per set in the windows' order (copal.distributed)
    window_nll = distributed.gather_rows(torch.cat(window_nll))
    nll = torch.zeros(len(names), dtype=torch.float64).index_add_(0, owners, window_nll)
    count = torch.zeros(len(names), dtype=torch.float64).index_add_(
        0, owners, torch.full((len(windows),), float(windows.shape[1] - 1), dtype=torch.float64))
    result = {name: math.exp(float(nll[i] / count[i])) for i, name in enumerate(names)}
    broken = [name for name, value in result.items() if not math.isfinite(value)]
    if broken:
        raise ValueError(f"perplexity on {', '.join(broken)} is {result[broken[0]]}: the model "
                         "gives NaN or Inf logits")
    return result


def bwt(matrix: List[List[float]]) -> Dict[str, float]:
    """BWT mean and max over the first T-1 datasets, in perplexity points, from
    ``matrix[t][i]`` = perplexity on dataset i after step t (T steps, T datasets or more)."""
    last = len(matrix) - 1
    if last < 1:
        return {"bwt_mean": 0.0, "bwt_max": 0.0}
    drops = [matrix[last][i] - matrix[i][i] for i in range(last)]
    return {"bwt_mean": sum(drops) / len(drops), "bwt_max": max(drops)}
