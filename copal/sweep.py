"""The block sweep: calibration windows -> embeddings -> for each block: load, observe, prune,
propagate, release. The device holds one block plus the calibration activations."""

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from . import distributed
from .methods import Method, Pattern, reduce_stats, unseen_layers
from .model import LayeredModel
from .phases import phase, progress

BlockStates = Optional[Callable[[int], Optional[Dict[str, torch.Tensor]]]]


def stream_blocks(lm: LayeredModel, order: Iterable[int], device, block_states: BlockStates = None,
                  timer=None) -> Iterator[Tuple[int, torch.nn.Module]]:
    """Yield ``(index, block)`` on ``device`` for each index of ``order``, reading the next block
    (from ``block_states``, or from the checkpoint when lazy) on a worker thread while the caller
    works on the current one; on a GPU the next block's host-to-device copy runs on a side
    stream from pinned memory, so transfers overlap compute. The caller unloads each block.

    The device holds at most two blocks: the current one and the next one's copy.
    """
    order = list(order)
    device = torch.device(device)
    cuda = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if cuda else None

    def stage(index):
        state = block_states(index) if block_states is not None else None
        if state is None and lm.lazy:
            state = lm.read_block_state(index)
        if state is None or not cuda:
            return state, None
        with torch.cuda.stream(copy_stream):
            staged = {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
                      for k, v in state.items()}
            done = torch.cuda.Event()
            done.record(copy_stream)
        return staged, done

    with ThreadPoolExecutor(1, thread_name_prefix="block-reader") as reader:
        upcoming = reader.submit(stage, order[0]) if order else None
        for position, index in enumerate(order):
            with phase(timer, "load"):
                state, done = upcoming.result()
                if position + 1 < len(order):
                    upcoming = reader.submit(stage, order[position + 1])
                owned = done is not None
                if owned:  # the compute stream waits for the copy, and the allocator knows it
                    torch.cuda.current_stream(device).wait_event(done)
                    for tensor in state.values():
                        tensor.record_stream(torch.cuda.current_stream(device))
                block = lm.load_block(index, device, state, owned=owned)
            yield index, block


def resolve_batch_size(batch_size, lm: LayeredModel, seq_len: int, device) -> int:
    """Windows per forward chunk. ``"auto"``: 1 on a CPU (measured fastest on the project's
    2-core machines: a block's activations stay in cache; 8 windows were 20-25% slower, see
    docs/performance.md); on a GPU as many as an eighth of the free memory holds, counting a
    block's intermediate tensors and the fp32 logits of the loss, at most 8 (8 x 2048 tokens
    already make 16k-row matmuls; larger chunks only add transient memory)."""
    if batch_size != "auto":
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        return batch_size
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    config = lm.config
    element = torch.empty((), dtype=lm.dtype).element_size()
    per_window = seq_len * ((6 * config.hidden_size + 3 * config.intermediate_size) * element
                            + 3 * config.vocab_size * 4)
    free, _ = torch.cuda.mem_get_info(device)
    # the ranks chunk the windows alike (copal.distributed): the smallest GPU decides
    return distributed.min_int(int(max(1, min(8, free // 8 // per_window))))


def release_pinned_cache() -> None:
    """Give the pinned host blocks that PyTorch caches after use back to the OS (they stay
    resident otherwise, and the next phase's buffers come on top). Does nothing where this
    torch has no way to do it."""
    empty = (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
             or getattr(torch._C, "_host_emptyCache", None))
    if empty is not None and torch.cuda.is_available():
        empty()


def park(hidden: torch.Tensor, offload: bool) -> torch.Tensor:
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
        return [park(lm.embed_tokens(ids.to(device)), offload) for ids in windows.split(batch_size)]


def run_blocks(lm: LayeredModel, block, chunks: List[torch.Tensor], device,
               offload: bool = False) -> List[torch.Tensor]:
    """Every chunk through ``block`` on ``device``; the outputs wait where the inputs did."""
    outputs = []
    for hidden in chunks:
        hidden = hidden.to(device, non_blocking=True)
        outputs.append(park(lm.run_block(block, hidden, lm.block_context(hidden)), offload))
    return outputs


class _Observed(Exception):
    """Raised by the last prunable layer's pre-hook: its input is recorded, the rest is unused."""


def observe_blocks(lm: LayeredModel, block, chunks: List[torch.Tensor], device) -> None:
    """Every chunk through ``block`` for the hooks' sake (the calibration statistics), stopping
    each chunk at the input of the Linear that runs last (``down_proj`` in the supported
    architectures): its matmul and what follows would only make an output that nobody reads (a
    quarter of an MLP's FLOPs). Which Linear runs last is seen on the first chunk, which runs
    whole, so the stop never comes before a Linear that the block runs after it. Where some
    Linear did not run on the first chunk (an expert no token was routed to), every chunk runs
    whole: a later chunk may run it after the first chunk's last."""
    order = []
    linears = lm.linears(block)
    watch = [linear.register_forward_pre_hook(lambda module, args: order.append(module))
             for linear in linears.values()]

    def stop(module, args):
        raise _Observed

    handle = None
    try:
        for position, hidden in enumerate(chunks):
            if position == 1:
                for hook in watch:
                    hook.remove()
                if len({id(module) for module in order}) == len(linears):
                    # after the statistics hooks: they run first
                    handle = order[-1].register_forward_pre_hook(stop)
            try:
                run_blocks(lm, block, [hidden], device)
            except _Observed:
                pass
    finally:
        for hook in watch:
            hook.remove()
        if handle is not None:
            handle.remove()


def prune_sweep(lm: LayeredModel, windows: torch.Tensor, method: Method, pattern: Pattern, *,
                device="cpu", batch_size="auto", block_states: BlockStates = None,
                on_block_done: Optional[Callable[[int, torch.nn.Module], None]] = None,
                offload_activations: bool = False, timer=None, desc: str = "prune") -> None:
    """Prune every block of ``lm`` in place with ``method``.

    ``block_states(i)`` gives the weights to start block i from (the dense W0 for restart,
    joint and COPAL) or None (the block as it is: cascade, or a lazy checkpoint's own weights).
    ``on_block_done(i, block)`` sees each finished block before it leaves the device (to write
    it to an output checkpoint). ``offload_activations`` keeps the calibration activations in
    pinned host memory between blocks, moving one chunk at a time to the device. ``timer``
    (:class:`copal.phases.PhaseTimer`) collects the time of each phase.

    In a group of ranks (copal.distributed) each rank observes its share of the windows, each
    block's statistics are reduced in the windows' order before its masks are made, every rank
    prunes alike (checked), and the sweep ends with a barrier, after which what rank 0 wrote in
    ``on_block_done`` is there for all.
    """
    observes = method.needs_acts or method.needs_gram
    if observes and len(windows) == 0:
        raise ValueError("no calibration windows: the dataset is empty")
    batch_size = resolve_batch_size(batch_size, lm, windows.shape[1], device)
    if observes:  # this rank's share (copal.distributed)
        windows = distributed.local_windows(windows, batch_size, "calibration windows")
    with phase(timer, "embed"):
        chunks = embed_windows(lm, windows, device, batch_size, offload_activations) if observes else []
    blocks = stream_blocks(lm, range(lm.num_blocks), device, block_states, timer)
    for index, block in progress(blocks, total=lm.num_blocks, desc=desc, unit="block"):
        linears = lm.linears(block)
        for name, linear in linears.items():
            pattern.check_layer(f"block {index} {name}", linear.in_features)
        following = observes and index + 1 < lm.num_blocks
        with torch.no_grad():
            with phase(timer, "forward"), method.observe(linears, lm.expert_layers(block)) as stats:
                if following and method.dense_inputs:  # the dense block's outputs go on
                    chunks = run_blocks(lm, block, chunks, device, offload_activations)
                else:
                    observe_blocks(lm, block, chunks, device)
            with phase(timer, "reduce"):
                reduce_stats(stats)
            unseen = unseen_layers(stats) if observes else []
            if unseen:
                warnings.warn(f"block {index}: no calibration token was routed to {len(unseen)} "
                              f"expert layer(s) ({', '.join(unseen[:3])}"
                              f"{', ...' if len(unseen) > 3 else ''}); a layer that never had "
                              "statistics is pruned by magnitude (docs/usage.md, mixture of "
                              "experts)")
            with phase(timer, "kernels"):
                method.prune_block(index, linears, stats, pattern)
            if distributed.active():
                distributed.check_same(distributed.weights_checksum(block),
                                       f"block {index}'s pruned weights")
            if following and not method.dense_inputs:  # the next block's inputs
                with phase(timer, "propagate"):
                    chunks = run_blocks(lm, block, chunks, device, offload_activations)
        with phase(timer, "offload"):
            if on_block_done is not None:
                on_block_done(index, block)
            lm.unload_block(index)
    distributed.barrier()  # what rank 0 wrote in on_block_done is there for every rank
