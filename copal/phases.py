"""Wall time per phase of a sweep (load, forward, kernels, propagate, offload, ...) and peak host
memory, for the benchmarks and the memory tests. The sweeps take an optional timer; without one
they time nothing and never wait."""

import contextlib
import sys
import threading
import time
from collections import defaultdict

import torch


class PhaseTimer:
    """``with timer("forward"): ...`` adds the phase's wall time to ``timer.seconds["forward"]``.

    On a GPU a phase ends when the compute stream has finished the phase's work (so the time is
    the phase's own, not the next one's); copies on other streams (prefetch) are not waited for,
    so overlapped transfers cost nothing here unless the compute waits for them ("load").
    """

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[phase] += time.perf_counter() - start
            self.calls[phase] += 1

    def total(self) -> float:
        return sum(self.seconds.values())


class HostPeak:
    """Peak resident host memory (VmRSS, Linux) while the context runs, sampled every
    ``interval`` seconds on a thread: ``start``, ``peak`` in bytes."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval

    def __enter__(self):
        self.peak = self.start = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def resident_bytes() -> int:
    """This process's resident memory now (Linux); elsewhere its peak so far (an upper bound)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) * 1024
    except FileNotFoundError:
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss: bytes on macOS, KB elsewhere)."""
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def progress(iterable, **kwargs):
    """A tqdm bar where a person watches (stderr is a terminal); nothing where output goes to a
    file or pipe (its redraws would flood it): the verbs log one line per finished step there.
    In a group of ranks only rank 0 shows one."""
    from tqdm.auto import tqdm

    from .distributed import is_writer

    return tqdm(iterable, disable=None if is_writer() else True, leave=False, **kwargs)


def phase(timer, name: str):
    """``timer(name)``, or a context that does nothing when there is no timer."""
    return timer(name) if timer is not None else contextlib.nullcontext()
