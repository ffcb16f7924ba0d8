"""Continual pruning over a sequence of datasets: the protocols, the COPAL update, the P matrix.

Protocols (METHOD.md): ``restart`` prunes W0 with D_t only; ``cascade`` prunes W_(t-1) with D_t;
``joint`` prunes W0 with the union of D_1..D_t's calibration sets (an oracle that stores past
data); ``continual`` is COPAL's own update (masks from W0 and the importance carried in the
state, no past data).
"""

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

from .atomic import write_atomically
from .data import Dataset
from .distributed import barrier as distributed_barrier
from .distributed import broadcast_path, is_writer, writer_first
from .evaluate import bwt, perplexities
from .gradients import gradient_norms
from .hessian import HessianState, step_dir
from .methods import (METHODS, CopalOptions, LayerHistory, Pattern, SparseGPT, check_obs_pattern,
                      make_method)
from .model import LayeredModel
from .outputs import WorkDir
from .state import load_history, save_history
from .sweep import prune_sweep

PROTOCOLS = ("restart", "cascade", "joint", "continual")


@dataclass
class RunSpec:
    """One continual run: a method under a protocol with a sparsity pattern.

    ``options``: COPAL's options (:class:`CopalOptions`; defaults for a COPAL run when None),
    refused for every other method. ``num_calibration``: use the first n windows of each
    dataset (None: all of them); refused for magnitude, which uses none. A config's ``[[runs]]``
    table gives COPAL's options as flat keys (:meth:`from_dict`)."""

    method: str
    protocol: str
    pattern: str = "50%"
    options: Optional[CopalOptions] = None
    num_calibration: Optional[int] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}")
        if (self.method == "copal") != (self.protocol == "continual"):
            raise ValueError("COPAL runs under its own protocol 'continual', and only COPAL does "
                             f"(got {self.method} with {self.protocol})")
        pattern = Pattern.parse(self.pattern)
        if self.method == "copal":
            self.options = self.options or CopalOptions()
            self.options.check_pattern(pattern)
        elif self.options is not None:
            raise ValueError(f"{self.method} runs take no COPAL options ({self.options})")
        if self.method == "sparsegpt":
            check_obs_pattern(pattern, SparseGPT.block_size)
        if self.num_calibration is not None:
            if isinstance(self.num_calibration, bool) or not isinstance(self.num_calibration, int) \
                    or self.num_calibration < 1:
                raise ValueError(f"num_calibration must be a positive integer, got "
                                 f"{self.num_calibration!r}")
            if self.method == "magnitude":
                raise ValueError("magnitude uses no calibration windows: a run's num_calibration "
                                 "does not apply to it")
        if self.method == "magnitude" and self.protocol == "joint":
            raise ValueError("magnitude uses no data, so its joint protocol is restart; use "
                             "restart or cascade")

    RUN_KEYS = ("method", "protocol", "pattern", "num_calibration")

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        """From a config's flat ``[[runs]]`` table: COPAL's options as keys beside the others."""
        data = dict(data)
        unknown = sorted(set(data) - set(cls.RUN_KEYS) - set(CopalOptions.FIELDS))
        if unknown:
            raise ValueError(f"unknown run key(s): {', '.join(unknown)}")
        copal = {key: data.pop(key) for key in CopalOptions.FIELDS if key in data}
        if data.get("method") == "copal":
            return cls(**data, options=CopalOptions.from_dict(copal))
        if copal:
            raise ValueError(f"{', '.join(copal)}: COPAL option(s), which a {data.get('method')} "
                             "run does not take")
        return cls(**data)

    def to_dict(self) -> dict:
        """Flat, as :meth:`from_dict` reads it; COPAL's options only for COPAL."""
        data = {key: getattr(self, key) for key in self.RUN_KEYS}
        return {**data, **self.options.to_dict()} if self.options is not None else data

    @property
    def label(self) -> str:
        extra = self.options.label if self.options is not None else ""
        samples = f" n={self.num_calibration}" if self.num_calibration else ""
        # the pattern as parsed: 0.5 and 50% are one run
        return f"{self.method}{extra}-{self.protocol} {Pattern.parse(self.pattern)}{samples}"


def state_metadata(model, model_fingerprint: str, datasets: List[str], options: CopalOptions,
                   pattern: Pattern, *, num_calibration: int, seq_len: int, seed, dtype: str,
                   batch_size, hessian_id: Optional[str] = None) -> dict:
    """What a COPAL state file records (``copal.state.METADATA_KEYS``): enough for ``copal
    continue`` to redo a step the same way with a new dataset (windows, compute dtype, batch
    size), and to check that the dense model it is given is the one the state was made from;
    ``hessian_id``: the OBS update's step that wrote the second-order blocks beside it."""
    return {"model": str(model), "model_fingerprint": model_fingerprint,
            "datasets": list(datasets), "pattern": pattern.exact, **options.to_dict(),
            "num_calibration": num_calibration, "seq_len": seq_len, "seed": seed,
            "dtype": dtype, "batch_size": batch_size, "hessian_id": hessian_id}


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
    """Pruned weights of a lazy model's blocks, one safetensors file per block in
    ``directory``: a model streamed from its checkpoint keeps no block in memory, so cascade and
    evaluation read the pruned blocks back from here.

    ``blocks(i)`` gives block i's saved weights, or None if it was not saved (the checkpoint's
    own dense weights); :meth:`save` is a sweep's ``on_block_done``.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        if is_writer():
            self.directory.mkdir(parents=True, exist_ok=True)
        self.saved = {int(p.stem.split("-")[1]) for p in self.directory.glob("block-*.safetensors")}

    def _path(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.safetensors"

    def save(self, index: int, block: torch.nn.Module) -> None:
        """Rank 0 writes; the other ranks of a group (copal.distributed) hold the same block
        and read rank 0's file once the sweep's closing barrier has passed."""
        if is_writer():
            state = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
            write_atomically(self._path(index), lambda name: save_file(state, name))
        self.saved.add(index)

    def __call__(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        return load_file(str(self._path(index))) if index in self.saved else None


class RunStore:
    """A run's finished steps on disk, so that a killed run resumes from its last finished step
    with the same numbers as an uninterrupted one (everything a step leaves is saved exactly):

    - ``progress.json``: the run's key and one record per finished step (its row of the P
      matrix, the held-out perplexity, its time); written last, so a step is finished exactly
      when this file names it;
    - ``history-NNNN.safetensors``: COPAL's vectors after step NNNN;
    - ``blocks-NNNN/``: the pruned blocks after step NNNN (cascade starts the next step from
      them; evaluation reads them).

    Files of any other step are leftovers (of a killed step, or superseded) and are removed on
    opening. :meth:`temporary` makes one that is not kept (a run that is not resumed).

    In a group of ranks (copal.distributed) rank 0 owns the store: the others read it and never
    write or remove anything (make them after rank 0's, :func:`copal.distributed.writer_first`).
    """

    PROGRESS = "progress.json"

    def __init__(self, directory, key: str, *, log=print, work: Optional[WorkDir] = None):
        self.directory = Path(directory)
        self.key = key
        self._work = work
        self.steps: List[dict] = []
        self.notes: dict = {}  # the owner's own facts about the run, saved with the next step
        self.on_commit = None  # called after each finished step is saved
        self.writer = is_writer()
        if self.writer:
            self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / self.PROGRESS
        if path.is_file():
            try:
                progress = json.loads(path.read_text())
            except ValueError:
                progress = {}
            if progress.get("key") == key:
                self.steps, self.notes = progress["steps"], progress.get("notes", {})
            elif self.writer:
                log(f"  discarded the unfinished steps in {self.directory}: made with another "
                    "config, data or model")
                path.unlink()
        if self.writer:
            self._remove_other_steps(keep=len(self.steps))

    @classmethod
    def temporary(cls, parent) -> "RunStore":
        """In a group of ranks, rank 0 makes the folder and the others use it."""
        work = writer_first(lambda: WorkDir(parent, ".copal-scratch-") if is_writer() else None)
        path = broadcast_path(work.path if work is not None else None)
        return cls(path, "", work=work)

    def _remove_other_steps(self, keep: int) -> None:
        for path in self.directory.iterdir():
            match = re.fullmatch(r"(history|blocks|hessian)-(\d{4})(\.safetensors)?", path.name)
            if match and int(match.group(2)) != keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def history(self) -> Dict[str, LayerHistory]:
        """COPAL's vectors after the last finished step (empty before the first)."""
        path = self.directory / f"history-{len(self.steps):04d}.safetensors"
        return load_history(path) if path.is_file() else {}

    def blocks(self, step: int) -> ScratchBlocks:
        return ScratchBlocks(self.directory / f"blocks-{step:04d}")

    def hessian_dir(self, step: int) -> Path:
        """COPAL's second-order state after ``step`` (copal.hessian)."""
        return step_dir(self.directory, step)

    def commit(self, record: dict, history: Dict[str, LayerHistory]) -> None:
        """Step ``len(steps) + 1`` is finished: its blocks are saved already; save its history,
        then its record, then drop the previous step's files."""
        step = len(self.steps) + 1
        if not self.writer:
            self.steps.append(record)
            return
        if history and self._work is None:
            save_history(self.directory / f"history-{step:04d}.safetensors", history)
        self.steps.append(record)
        progress = json.dumps({"key": self.key, "steps": self.steps, "notes": self.notes},
                              indent=1)
        write_atomically(self.directory / self.PROGRESS, lambda name: Path(name).write_text(progress))
        self._remove_other_steps(keep=step)
        if self.on_commit is not None:
            self.on_commit()

    def close(self, remove: bool = True) -> None:
        distributed_barrier()  # no rank reads the store any more
        if not self.writer:
            return
        if self._work is not None:
            self._work.release()
        elif remove:
            shutil.rmtree(self.directory, ignore_errors=True)


def copal_method(lm, history, windows, options: CopalOptions, *, device="cpu", batch_size="auto",
                 block_states=None, hessians: Optional[HessianState] = None, desc="gradients"):
    """COPAL for one step: this step's gradient pass over the dense model (unless
    ``options.gradient == "none"``), and the method that appends to ``history`` (or, for the
    OBS update, to the second-order state ``hessians``) and prunes."""
    grads = None
    if options.gradient == "lm":
        grads = gradient_norms(lm, windows, device=device, batch_size=batch_size,
                               block_states=block_states, desc=desc)
    return make_method("copal", history=history, grad_norms=grads, options=options,
                       hessians=hessians)


def hessian_state(options: CopalOptions, previous: Optional[Path], target: Optional[Path],
                  step: int) -> Optional[HessianState]:
    """The second-order state of step ``step`` for COPAL's OBS update (None for mask-only);
    ``target`` None: not written (ranks other than 0 of a run whose rank 0 writes it)."""
    if not options.obs:
        return None
    return HessianState(previous, target, step, options.step_weighting, options.step_weight(step))


def prune_step(lm, dense, history, windows, pattern, spec, *, device, batch_size, offload, desc,
               start_from=None, on_block_done=None, hessians: Optional[HessianState] = None):
    """One step of ``spec``'s protocol with ``windows`` (for joint: every dataset's so far).
    COPAL: gradient pass on W0 (unless gradient='none'), then the sweep from W0 with the
    importance of every step (``history`` grows by one; the OBS update adds the step to
    ``hessians``); restart and joint sweep from W0; cascade from ``start_from`` (the current
    weights: None for those ``lm`` holds, or a lazy model's last pruned blocks). W0 is
    ``dense`` (None: a lazy model's checkpoint). ``on_block_done`` receives the pruned blocks
    (a lazy model's :meth:`ScratchBlocks.save`)."""
    if spec.method == "copal":
        method = copal_method(lm, history, windows, spec.options, device=device,
                              batch_size=batch_size, block_states=dense, hessians=hessians,
                              desc=f"{desc} gradients")
    else:
        method = make_method(spec.method)
    prune_sweep(lm, windows, method, pattern, device=device, batch_size=batch_size,
                block_states=start_from if spec.protocol == "cascade" else dense,
                offload_activations=offload, desc=f"{desc} prune", on_block_done=on_block_done)


def run_continual(lm: LayeredModel, dense: Optional[DenseWeights], datasets: List[Dataset],
                  spec: RunSpec, *, heldout: Optional[Dataset] = None, device="cpu",
                  batch_size="auto", offload_activations: bool = False,
                  scratch_dir=None, store: Optional[RunStore] = None, log=print) -> dict:
    """Run ``spec`` over ``datasets`` in order; after each step evaluate every dataset (and the
    held-out one).

    ``lm`` in memory: ``dense`` holds W0 and ``lm`` is left holding the last step's weights.
    ``lm`` lazy (streamed from its checkpoint, :meth:`LayeredModel.from_checkpoint`): pass
    ``dense=None`` (W0 is read from the checkpoint) and either ``store`` (a :class:`RunStore`:
    the run continues after the steps it has finished, and saves each one it finishes) or
    ``scratch_dir``, under which a temporary store keeps the pruned blocks between steps
    (removed at the end). The host then holds about one block, never the model."""
    if lm.lazy and (dense is not None or (scratch_dir is None and store is None)):
        raise ValueError("a lazy model reads W0 from its checkpoint: pass dense=None and a "
                         "scratch_dir or a store for the pruned blocks")
    if store is not None and not lm.lazy:
        raise ValueError("a run store keeps the pruned blocks of a lazy model; a model in memory "
                         "holds its own")
    if spec.options is not None:
        spec.options.check_steps(len(datasets))
    owned = store is None and lm.lazy
    if owned:
        store = RunStore.temporary(scratch_dir)
    hessian_root = None  # a model in memory keeps its second-order state in a temporary folder
    if store is None and spec.options is not None and spec.options.obs:
        hessian_root = tempfile.TemporaryDirectory(prefix="copal-hessian-")
    try:
        return _run_steps(lm, dense, datasets, spec, heldout, store, hessian_root,
                          device=device, batch_size=batch_size,
                          offload_activations=offload_activations, log=log)
    finally:
        if owned:
            store.close()
        if hessian_root is not None:
            hessian_root.cleanup()


def _run_steps(lm, dense, datasets, spec, heldout, store, hessian_root, *, device, batch_size,
               offload_activations, log) -> dict:
    pattern = Pattern.parse(spec.pattern)
    test_sets = {d.name: d.test for d in datasets}
    if heldout is not None:
        test_sets[f"heldout:{heldout.name}"] = heldout.test
    done = list(store.steps) if store is not None else []
    history: Dict[str, LayerHistory] = store.history() if done else {}
    current = store.blocks(len(done)) if done else None  # the last finished step's blocks
    if store is None:  # in memory: every run starts from the dense model
        for index in range(lm.num_blocks):
            lm.load_block(index, "cpu", dense(index))
    if done:
        log(f"  {spec.label}: resuming after step {len(done)}/{len(datasets)}, saved in "
            f"{store.directory}")
    for step in range(len(done), len(datasets)):
        dataset = datasets[step]
        started = time.perf_counter()
        desc = f"{spec.label} step {step + 1}/{len(datasets)} ({dataset.name})"
        windows = dataset.calibration[: spec.num_calibration] if spec.num_calibration else dataset.calibration
        if spec.protocol == "joint":
            windows = torch.cat([d.calibration[: spec.num_calibration] if spec.num_calibration
                                 else d.calibration for d in datasets[: step + 1]])
        written = store.blocks(step + 1) if store is not None else None
        hessians = None
        if spec.options is not None and spec.options.obs:
            where = store.hessian_dir if store is not None else (
                lambda t: step_dir(hessian_root.name, t))
            target = where(step + 1) if store is None or store.writer else None
            hessians = hessian_state(spec.options, where(step) if step else None, target,
                                     step + 1)
        prune_step(lm, dense, history, windows, pattern, spec, device=device,
                   batch_size=batch_size, offload=offload_activations, desc=desc,
                   start_from=current, on_block_done=written.save if written else None,
                   hessians=hessians)
        if hessian_root is not None and step:
            shutil.rmtree(step_dir(hessian_root.name, step))
        ppl = perplexities(lm, test_sets, device=device, batch_size=batch_size,
                           block_states=written, offload_activations=offload_activations,
                           desc=f"{desc} evaluate")
        record = {"P": [ppl[d.name] for d in datasets],
                  "heldout": ppl[f"heldout:{heldout.name}"] if heldout is not None else None,
                  "seconds": time.perf_counter() - started}
        if store is not None:
            store.commit(record, history)
        done.append(record)
        current = written
        log(f"  {desc}: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
            + f"  ({record['seconds']:.0f} s)")
    matrix = [record["P"] for record in done]
    final = matrix[-1]
    return {
        "spec": spec.to_dict(),
        "label": spec.label,
        "datasets": [d.name for d in datasets],
        "P": matrix,
        "heldout": ({"name": heldout.name, "ppl": [record["heldout"] for record in done]}
                    if heldout is not None else None),
        **bwt(matrix),
        "final_mean": sum(final) / len(final),
        "diagonal": [matrix[t][t] for t in range(len(datasets))],
        "step_seconds": [record["seconds"] for record in done],
        "seconds": sum(record["seconds"] for record in done),
        "history": history,
        # COPAL's second-order state after the last step, in the store (a lazy model's run)
        "hessian_dir": (store.hessian_dir(len(done)) if store is not None and spec.options
                        is not None and spec.options.obs else None),
    }
