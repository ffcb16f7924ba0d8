"""Continual pruning over a sequence of datasets: the protocols, the COPAL update, the P matrix.

Protocols (METHOD.md): ``restart`` prunes W0 with D_t only; ``cascade`` prunes W_(t-1) with D_t;
``joint`` prunes W0 with the union of D_1..D_t's calibration sets (an oracle that stores past
data); ``continual`` is COPAL's own update (masks from W0 and the importance carried in the
state, no past data).
"""

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

from copal_kernels import AGGREGATIONS

from .atomic import write_atomically
from .data import Dataset
from .evaluate import bwt, perplexities
from .gradients import gradient_norms
from .methods import (DEFAULT_AGGREGATION, DEFAULT_GRADIENT, DEFAULT_NORMALISATION, GRADIENTS,
                      METHODS, NORMALISATIONS, LayerHistory, Pattern, make_method)
from .model import LayeredModel
from .sweep import prune_sweep

PROTOCOLS = ("restart", "cascade", "joint", "continual")


@dataclass
class RunSpec:
    """One continual run: a method under a protocol with a sparsity pattern."""

    method: str
    protocol: str
    pattern: str = "50%"
    aggregation: str = DEFAULT_AGGREGATION  # COPAL: max, sum or sumsq over steps
    gradient: str = DEFAULT_GRADIENT  # COPAL: "lm" (gradient pass) or "none" (g = 1)
    step_weights: Optional[List[float]] = None  # COPAL: lambda_t
    normalisation: str = DEFAULT_NORMALISATION  # COPAL: "mean" (divided by their mean) or "none"
    group: str = "row"  # COPAL, unstructured: per-row comparison groups or one per "layer"
    num_calibration: Optional[int] = None  # None: all windows of the dataset

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}")
        if (self.method == "copal") != (self.protocol == "continual"):
            raise ValueError("COPAL runs under its own protocol 'continual', and only COPAL does "
                             f"(got {self.method} with {self.protocol})")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.group not in ("row", "layer"):
            raise ValueError(f"group must be 'row' or 'layer', got {self.group!r}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        Pattern.parse(self.pattern)

    @property
    def label(self) -> str:
        extra = ""
        if self.method == "copal":
            extra = f"[{self.aggregation},{'grad' if self.gradient == 'lm' else 'nograd'}"
            extra += f",lambda={self.step_weights}" if self.step_weights else ""
            extra += ",raw" if self.normalisation == "none" else ""
            extra += ",layer-group]" if self.group == "layer" else "]"
        samples = f" n={self.num_calibration}" if self.num_calibration else ""
        return f"{self.method}{extra}-{self.protocol} {self.pattern}{samples}"


def state_metadata(model, datasets: List[str], spec: RunSpec, *, num_calibration: int,
                   seq_len: int, seed) -> dict:
    """What a COPAL state file records (``copal.state.METADATA_KEYS``): enough for ``copal
    continue`` to redo a step the same way with a new dataset."""
    return {"model": str(model), "datasets": list(datasets),
            "pattern": str(Pattern.parse(spec.pattern)), "gradient": spec.gradient,
            "aggregation": spec.aggregation, "normalisation": spec.normalisation,
            "group": spec.group, "step_weights": spec.step_weights,
            "num_calibration": num_calibration, "seq_len": seq_len, "seed": seed}


@dataclass
class DenseWeights:
    """W0 of every block, kept on the host, so that restart/joint/COPAL start from it."""

    blocks: List[Dict[str, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def snapshot(cls, lm: LayeredModel) -> "DenseWeights":
        """Host copies, pinned when there is a GPU: every step streams them to the device again
        (sweep.stream_blocks would otherwise pin a fresh copy of each block on every read)."""
        pin = torch.cuda.is_available()
        return cls([{k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin).copy_(v)
                     for k, v in lm.block_state(i).items()} for i in range(lm.num_blocks)])

    def __call__(self, index: int) -> Dict[str, torch.Tensor]:
        return self.blocks[index]


class ScratchBlocks:
    """The current (pruned) weights of a lazy model's blocks between steps, one safetensors file
    per block in a fresh folder ``SCRATCH_PREFIX*`` under ``parent`` (deleted by :meth:`close`):
    a model streamed from its checkpoint keeps no block in memory, so cascade and evaluation
    read the pruned blocks back from here.

    ``scratch(i)`` gives block i's last saved weights, or None before it was first saved (the
    checkpoint's own dense weights); :meth:`save` is a sweep's ``on_block_done``.
    """

    SCRATCH_PREFIX = ".copal-scratch-"

    def __init__(self, parent):
        Path(parent).mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=self.SCRATCH_PREFIX, dir=parent))
        self.saved = set()

    def _path(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.safetensors"

    def save(self, index: int, block: torch.nn.Module) -> None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        # a new file: a reader of the old one is never disturbed
        write_atomically(self._path(index), lambda name: save_file(state, name))
        self.saved.add(index)

    def __call__(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        return load_file(str(self._path(index))) if index in self.saved else None

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.saved.clear()


def copal_method(lm, history, windows, *, gradient=DEFAULT_GRADIENT,
                 aggregation=DEFAULT_AGGREGATION, step_weights=None,
                 normalisation=DEFAULT_NORMALISATION, group="row", device="cpu", batch_size="auto",
                 block_states=None, desc="gradients"):
    """COPAL for one step: this step's gradient pass over the dense model (unless
    ``gradient="none"``), and the method that appends to ``history`` and prunes."""
    grads = None
    if gradient == "lm":
        grads = gradient_norms(lm, windows, device=device, batch_size=batch_size,
                               block_states=block_states, desc=desc)
    return make_method("copal", history=history, grad_norms=grads, aggregation=aggregation,
                       step_weights=step_weights, normalisation=normalisation, group=group)


def prune_step(lm, dense, history, windows, pattern, spec, *, device, batch_size, offload, desc,
               current: Optional[ScratchBlocks] = None):
    """One step of ``spec``'s protocol with ``windows`` (for joint: every dataset's so far).
    COPAL: gradient pass on W0 (unless gradient='none'), then the sweep from W0 with the
    importance of every step (``history`` grows by one); restart and joint sweep from W0;
    cascade from the current weights. W0 is ``dense`` (None: a lazy model's checkpoint); the
    current weights are those ``lm`` holds, or for a lazy model ``current``, which also receives
    the pruned blocks."""
    if spec.method == "copal":
        method = copal_method(lm, history, windows, gradient=spec.gradient,
                              aggregation=spec.aggregation, step_weights=spec.step_weights,
                              normalisation=spec.normalisation, group=spec.group, device=device,
                              batch_size=batch_size, block_states=dense,
                              desc=f"{desc} gradients")
    else:
        method = make_method(spec.method)
    start_from = current if spec.protocol == "cascade" else dense
    prune_sweep(lm, windows, method, pattern, device=device, batch_size=batch_size,
                block_states=start_from, offload_activations=offload, desc=f"{desc} prune",
                on_block_done=current.save if current is not None else None)


def run_continual(lm: LayeredModel, dense: Optional[DenseWeights], datasets: List[Dataset],
                  spec: RunSpec, *, heldout: Optional[Dataset] = None, device="cpu",
                  batch_size="auto", offload_activations: bool = False,
                  scratch_dir=None, log=print) -> dict:
    """Run ``spec`` over ``datasets`` in order; after each step evaluate every dataset (and the
    held-out one).

    ``lm`` in memory: ``dense`` holds W0 and ``lm`` is left holding the last step's weights.
    ``lm`` lazy (streamed from its checkpoint, :meth:`LayeredModel.from_checkpoint`): pass
    ``dense=None`` (W0 is read from the checkpoint) and ``scratch_dir``, under which the pruned
    blocks wait between steps (:class:`ScratchBlocks`, removed at the end), so the host holds
    about one block, never the model."""
    if lm.lazy and (dense is not None or scratch_dir is None):
        raise ValueError("a lazy model reads W0 from its checkpoint: pass dense=None and a "
                         "scratch_dir for the pruned blocks")
    current = ScratchBlocks(scratch_dir) if lm.lazy else None
    try:
        return _run_steps(lm, dense, datasets, spec, heldout, current, device=device,
                          batch_size=batch_size, offload_activations=offload_activations, log=log)
    finally:
        if current is not None:
            current.close()


def _run_steps(lm, dense, datasets, spec, heldout, current, *, device, batch_size,
               offload_activations, log) -> dict:
    pattern = Pattern.parse(spec.pattern)
    history: Dict[str, LayerHistory] = {}
    test_sets = {d.name: d.test for d in datasets}
    if heldout is not None:
        test_sets[f"heldout:{heldout.name}"] = heldout.test
    if current is None:  # every run starts from the dense model (a lazy one reads it anyway)
        for index in range(lm.num_blocks):
            lm.load_block(index, "cpu", dense(index))
    matrix, heldout_ppl, step_seconds = [], [], []
    for step, dataset in enumerate(datasets):
        started = time.perf_counter()
        desc = f"{spec.label} step {step + 1}/{len(datasets)} ({dataset.name})"
        windows = dataset.calibration[: spec.num_calibration] if spec.num_calibration else dataset.calibration
        if spec.protocol == "joint":
            windows = torch.cat([d.calibration[: spec.num_calibration] if spec.num_calibration
                                 else d.calibration for d in datasets[: step + 1]])
        prune_step(lm, dense, history, windows, pattern, spec, device=device,
                   batch_size=batch_size, offload=offload_activations, desc=desc,
                   current=current)
        ppl = perplexities(lm, test_sets, device=device, batch_size=batch_size,
                           block_states=current, offload_activations=offload_activations,
                           desc=f"{desc} evaluate")
        step_seconds.append(time.perf_counter() - started)
        matrix.append([ppl[d.name] for d in datasets])
        if heldout is not None:
            heldout_ppl.append(ppl[f"heldout:{heldout.name}"])
        log(f"  {desc}: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
            + f"  ({step_seconds[-1]:.0f} s)")
    final = matrix[-1]
    return {
        "spec": asdict(spec),
        "label": spec.label,
        "datasets": [d.name for d in datasets],
        "P": matrix,
        "heldout": {"name": heldout.name, "ppl": heldout_ppl} if heldout is not None else None,
        **bwt(matrix),
        "final_mean": sum(final) / len(final),
        "diagonal": [matrix[t][t] for t in range(len(datasets))],
        "step_seconds": step_seconds,
        "seconds": sum(step_seconds),
        "history": history,
    }
