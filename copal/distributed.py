"""Data parallelism on ``torch.distributed``: calibration and test windows split over the ranks,
statistics reduced in an order that does not depend on how many ranks there are.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the CLI joins the process group
(:func:`setup`: NCCL on GPUs, gloo on CPUs); a Python program joins it itself with
``torch.distributed.init_process_group`` before calling the API. Without a process group every
function here is the single-process case: one rank holding every window.

Why the reduction is not an all-reduce: its summation order depends on the backend and on the
number of ranks, so fp32 statistics can differ in their last bits and flip near-tied weights.
Here every statistic is a sum of *partials*, one per unit of calibration (a window, or a chunk
of ``batch_size`` windows), and the sum is always ``((0 + p_0) + p_1) + ...`` in the units'
global order. A single process adds each partial as it comes; a rank of a group keeps its own
partials, and :func:`reduce_sums` has each rank broadcast them in turn, every rank adding them
in that order. So the bits are the same on 1, 2 or 3 ranks, provided the chunks are the same
(the same ``batch_size``): ranks own whole chunks (:func:`local_windows`).

Every rank then computes the same masks from the same statistics and the same weights (the
kernels are deterministic): nothing is sent but statistics, and each block's pruned weights are
checked to agree across ranks (:func:`check_same`). Only rank 0 writes files
(:func:`is_writer`); the others read what it wrote after a barrier, so several nodes need the
output folder on a shared filesystem (:func:`check_shared_folder`).
"""

import contextlib
import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist


def active() -> bool:
    """A process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """This process writes the outputs, logs and results (rank 0, or the only process)."""
    return rank() == 0


def launched() -> bool:
    """This process was started by ``torchrun`` with other ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (nothing to do
    when this process is alone) and return the device this rank computes on: ``cuda`` becomes
    ``cuda:LOCAL_RANK``. Raises ValueError for a device that several ranks would share."""
    device = torch.device(device)
    if not launched():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device} under torchrun: pass --device cuda, and each "
                             "rank computes on cuda:LOCAL_RANK")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        minutes = float(os.environ.get("COPAL_DIST_TIMEOUT_MINUTES", "60"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=minutes))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Traffic:
    """What this process spent in the statistics' collectives so far (for the benchmarks):
    wall seconds, bytes it sent or received, and calls."""

    def __init__(self):
        self.seconds, self.bytes, self.calls = 0.0, 0, 0

    @contextlib.contextmanager
    def measure(self, nbytes: int = 0):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started
            self.bytes += nbytes
            self.calls += 1


traffic = _Traffic()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def chunk_share(chunks: int) -> range:
    """This rank's chunks of ``chunks``: a contiguous, balanced share, rank 0's first."""
    ranks, me = world_size(), rank()
    return range(me * chunks // ranks, (me + 1) * chunks // ranks)


def local_windows(windows: torch.Tensor, batch_size: int, what: str = "windows") -> torch.Tensor:
    """This rank's windows of ``windows`` [N, S]: whole chunks of ``batch_size`` windows (the
    chunks a single process would make), so every chunk computes the same on any number of
    ranks. Raises ValueError when there are fewer chunks than ranks."""
    if not active():
        return windows
    chunks = math.ceil(len(windows) / batch_size)
    if chunks < world_size():
        raise ValueError(f"{len(windows)} {what} make {chunks} chunk(s) of batch size "
                         f"{batch_size}, fewer than the {world_size()} ranks: every rank needs "
                         "at least one (more windows, a smaller --batch-size, or fewer ranks)")
    share = chunk_share(chunks)
    return windows[share.start * batch_size: share.stop * batch_size]


class OrderedSum:
    """A statistic summed from partials in a fixed order: ``value`` = ``0 + p_0 + p_1 + ...``.

    Alone, each partial is added as it comes; in a group, a rank keeps its partials until
    :func:`reduce_sums`. Partials must be added in the order of this rank's units."""

    def __init__(self, shape, device):
        self.value = torch.zeros(shape, device=device, dtype=torch.float32)
        self.partials: Optional[List[torch.Tensor]] = [] if active() else None

    def add(self, partial: torch.Tensor) -> None:
        if self.partials is None:
            self.value.add_(partial)
        else:
            self.partials.append(partial)


def reduce_sums(sums: Iterable[OrderedSum]) -> None:
    """Fold every rank's partials into each sum's ``value``, rank 0's units first, in place.
    The k-th partials of every sum that has one on a rank are sent together, one broadcast per
    unit; sums may hold different numbers (an expert's Linears get a partial only from the chunks
    that route a token to it). Nothing to do for a single process."""
    sums = [s for s in sums if s.partials is not None]
    if not sums:
        return
    counts = _gather_ints([len(s.partials) for s in sums])
    device = _comm_device()
    for source, per_sum in enumerate(counts):
        for unit in range(max(per_sum)):
            members = [s for s, count in zip(sums, per_sum) if unit < count]
            sizes = [s.value.numel() for s in members]
            if source == rank():
                flat = torch.cat([s.partials[unit].reshape(-1).to(device, torch.float32)
                                  for s in members])
            else:
                flat = torch.empty(sum(sizes), device=device, dtype=torch.float32)
            with traffic.measure(flat.numel() * 4):
                dist.broadcast(flat, src=source)
            for s, part in zip(members, flat.split(sizes)):
                s.value.add_(part.view_as(s.value).to(s.value.device))
    for s in sums:
        s.partials = []


def _gather_ints(values: List[int]) -> List[List[int]]:
    """Every rank's list of ``len(values)`` integers, in rank order."""
    mine = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    everyone = [torch.empty_like(mine) for _ in range(world_size())]
    with traffic.measure(mine.numel() * 8 * world_size()):
        dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


def sum_ints(values: List[int]) -> List[int]:
    """The sum over ranks of each integer (token and window counts): exact."""
    if not active():
        return list(values)
    return [sum(column) for column in zip(*_gather_ints(values))]


def min_int(value: int) -> int:
    """The smallest of the ranks' ``value`` (a setting every rank must share)."""
    if not active():
        return value
    return min(v[0] for v in _gather_ints([value]))


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` [n_rank, ...] concatenated in rank order (host tensor)."""
    if not active():
        return local
    counts = [c[0] for c in _gather_ints([local.shape[0]])]
    device = _comm_device()
    padded = torch.zeros((max(counts),) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    everyone = [torch.empty_like(padded) for _ in counts]
    with traffic.measure(padded.numel() * padded.element_size() * len(counts)):
        dist.all_gather(everyone, padded)
    return torch.cat([t[:n] for t, n in zip(everyone, counts)]).cpu()


def broadcast_path(path: Optional[Path]) -> Optional[Path]:
    """Rank 0's ``path`` on every rank (a folder rank 0 made for all)."""
    if not active():
        return path
    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] is not None else None


def barrier() -> None:
    """Wait for every rank (after rank 0 wrote what the others read)."""
    if active():
        dist.barrier()


def from_writer(make):
    """``make()`` on rank 0 alone (a check or a step that may create files); every rank returns
    its result, or raises its error, so all stop alike."""
    if not active():
        return make()
    box = [None]
    if is_writer():
        try:
            box = [(True, make())]
        except Exception as error:  # every rank raises it
            box = [(False, error)]
    dist.broadcast_object_list(box, src=0)
    done, payload = box[0]
    if not done:
        raise payload
    return payload


def writer_first(make):
    """``make()`` on rank 0, then on the other ranks once it returned: for steps that may
    create or clean files which the other ranks then only read."""
    if not active():
        return make()
    if is_writer():
        result = make()
        barrier()
        return result
    barrier()
    return make()


def check_same(values: torch.Tensor, what: str) -> None:
    """Raise RuntimeError on every rank if the ranks' ``values`` (a small float64 vector, e.g.
    checksums of pruned weights) are not bit for bit the same."""
    if not active():
        return
    everyone = gather_rows(values.reshape(1, -1).to(torch.float64))
    if not all(torch.equal(everyone[0], row) for row in everyone):
        raise RuntimeError(f"the ranks disagree on {what}: the masks are no longer identical "
                           "across ranks (a non-deterministic kernel on some rank?)")


def weights_checksum(module: torch.nn.Module) -> torch.Tensor:
    """float64 [2 x parameters]: each parameter's sum and its count of zeros."""
    values = []
    for parameter in module.parameters():
        values += [parameter.detach().double().sum(), (parameter == 0).sum().double()]
    return torch.stack(values).cpu() if values else torch.zeros(0, dtype=torch.float64)


def check_shared_folder(folder: Path) -> None:
    """Several ranks read what rank 0 writes under ``folder``: rank 0 writes a probe file there
    and every rank must see it (ValueError otherwise: nodes without a shared filesystem)."""
    if not active():
        return
    folder = Path(folder)
    probe = folder / f".copal-probe-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    if is_writer():
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
    barrier()
    seen = sum_ints([int(probe.is_file())])[0]
    barrier()
    if is_writer():
        probe.unlink(missing_ok=True)
    if seen != world_size():
        raise ValueError(f"{folder}: {world_size() - seen} of {world_size()} ranks cannot see "
                         "what rank 0 writes there; put the output folder on a filesystem that "
                         "every node shares")
