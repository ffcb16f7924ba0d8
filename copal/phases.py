"""Wall time per phase of a sweep (load, forward, kernels, propagate, offload, ...), for the
benchmarks. The sweeps take an optional timer; without one they time nothing and never wait."""

import contextlib
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


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def phase(timer, name: str):
    """``timer(name)``, or a context that does nothing when there is no timer."""
    return timer(name) if timer is not None else contextlib.nullcontext()
