"""The user's verbs as Python functions: prune a checkpoint, continue a COPAL-pruned model with a
new dataset, evaluate; and :class:`ContinualPruner` for a model already in memory. Checkpoints
are streamed block by block: read lazily from the input's shards, written shard by shard into a
staging directory that replaces the output at the end."""

from pathlib import Path
from typing import Dict, List, Optional

import torch
from transformers import AutoConfig, AutoTokenizer

from .assets import resolve_model
from .checkpoint import ShardWriter
from .data import make_dataset
from .evaluate import perplexities
from .continual import DenseWeights, RunSpec, copal_method, prune_step, state_metadata
from .methods import (DEFAULT_AGGREGATION, DEFAULT_GRADIENT, DEFAULT_NORMALISATION, LayerHistory,
                      Pattern, make_method)
from .model import LayeredModel, resolve_dtype
from .state import load_state, save_state
from .sweep import prune_sweep


def _write_pruned(lm: LayeredModel, model_dir: Path, out_dir, overwrite: bool, run_sweep):
    """Run ``run_sweep(on_block_done)`` writing each finished block as a shard of ``out_dir``."""
    writer = ShardWriter(out_dir, lm.num_blocks + 1, overwrite=overwrite, protect=[model_dir])
    try:
        def write_block(index, block):
            prefix = lm.block_names[index]
            writer.write_shard(index, {f"{prefix}.{k}": v for k, v in block.state_dict().items()})

        run_sweep(write_block)
        writer.write_shard(lm.num_blocks, lm.outer_state())

        def save_extra(staging):
            AutoConfig.from_pretrained(model_dir).save_pretrained(staging)
            try:
                AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging)
            except (OSError, ValueError):
                pass  # a checkpoint without a tokenizer stays without one

        return writer.finish(save_extra)
    except BaseException:
        writer.abort()
        raise


def prune_checkpoint(model: str, data: str, out_dir, *, method: str = "wanda", pattern: str = "50%",
                     num_calibration: int = 32, seq_len: int = 512, seed: int = 0, device="cpu",
                     batch_size="auto", dtype="auto", gradient: str = DEFAULT_GRADIENT,
                     aggregation: str = DEFAULT_AGGREGATION,
                     normalisation: str = DEFAULT_NORMALISATION,
                     group: str = "row", offload_activations: bool = False,
                     state_out=None, overwrite: bool = False, log=print) -> Path:
    """Prune ``model`` (a checkpoint directory, or ``smollm2-135m``) with ``data``'s calibration
    windows and write the pruned checkpoint to ``out_dir``. For ``method="copal"`` this is step
    1 and the state is written to ``state_out`` (default ``out_dir``/copal-state.safetensors).
    ``offload_activations`` keeps the calibration activations in pinned host memory between
    blocks (on a GPU; the device then holds one block and one chunk)."""
    model_dir = resolve_model(model, progress=log)
    parsed = Pattern.parse(pattern)
    lm = LayeredModel.from_checkpoint(model_dir, dtype=resolve_dtype(dtype, device))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = make_dataset(data, tokenizer, num_calibration=num_calibration, num_test=0,
                           seq_len=seq_len, seed=seed)
    history: Dict[str, LayerHistory] = {}
    if method == "copal":
        pruner = copal_method(lm, history, dataset.calibration, gradient=gradient,
                              aggregation=aggregation, normalisation=normalisation, group=group,
                              device=device, batch_size=batch_size)
    else:
        pruner = make_method(method)
    log(f"pruning {model_dir} with {method} at {parsed} on {data} "
        f"({len(dataset.calibration)} windows of {seq_len} tokens)")
    out = _write_pruned(lm, model_dir, out_dir, overwrite, lambda done: prune_sweep(
        lm, dataset.calibration, pruner, parsed, device=device, batch_size=batch_size,
        offload_activations=offload_activations, on_block_done=done))
    if method == "copal":
        state_path = Path(state_out) if state_out else out / "copal-state.safetensors"
        spec = RunSpec("copal", "continual", str(parsed), aggregation=aggregation,
                       gradient=gradient, normalisation=normalisation, group=group)
        save_state(state_path, history, state_metadata(
            Path(model_dir).resolve(), [data], spec, num_calibration=num_calibration,
            seq_len=seq_len, seed=seed))
        log(f"COPAL state {state_path}")
    log(f"pruned checkpoint {out}")
    return out


def continue_checkpoint(state: str, data: str, out_dir, *, device="cpu", batch_size="auto",
                        dtype="auto", offload_activations: bool = False, state_out=None,
                        overwrite: bool = False, log=print) -> Path:
    """Add dataset ``data`` to a COPAL run from its saved state alone (no past data): masks are
    recomputed from the dense model named in the state with the importance of every step."""
    history, meta = load_state(state)
    if meta["step_weights"]:
        raise ValueError(f"{state}: made with fixed step weights lambda={meta['step_weights']} "
                         "for its steps; continuing it would need one more, which copal "
                         "continue does not take")
    model_dir = Path(meta["model"])
    if not model_dir.is_dir():
        raise FileNotFoundError(f"the state's dense model {model_dir} is gone")
    lm = LayeredModel.from_checkpoint(model_dir, dtype=resolve_dtype(dtype, device))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = make_dataset(data, tokenizer, num_calibration=meta["num_calibration"], num_test=0,
                           seq_len=meta["seq_len"], seed=meta["seed"])
    pruner = copal_method(lm, history, dataset.calibration, gradient=meta["gradient"],
                          aggregation=meta["aggregation"],
                          normalisation=meta["normalisation"], group=meta["group"],
                          device=device, batch_size=batch_size)
    pattern = Pattern.parse(meta["pattern"])
    log(f"COPAL step {len(meta['datasets']) + 1} on {data} after {', '.join(meta['datasets'])}")
    out = _write_pruned(lm, model_dir, out_dir, overwrite, lambda done: prune_sweep(
        lm, dataset.calibration, pruner, pattern, device=device, batch_size=batch_size,
        offload_activations=offload_activations, on_block_done=done))
    meta["datasets"] = meta["datasets"] + [data]
    state_path = Path(state_out) if state_out else out / "copal-state.safetensors"
    save_state(state_path, history, meta)
    log(f"COPAL state {state_path}\npruned checkpoint {out}")
    return out


def evaluate_checkpoint(model: str, sources: List[str], *, num_test: int = 32, seq_len: int = 512,
                        device="cpu", batch_size="auto", dtype="auto",
                        offload_activations: bool = False,
                        tokenizer_from: Optional[str] = None) -> Dict[str, float]:
    """Perplexity of a checkpoint on each source's test windows, streamed block by block."""
    model_dir = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or model_dir)
    lm = LayeredModel.from_checkpoint(model_dir, dtype=resolve_dtype(dtype, device))
    tests = {s: make_dataset(s, tokenizer, num_calibration=0, num_test=num_test,
                             seq_len=seq_len).test for s in sources}
    return perplexities(lm, tests, device=device, batch_size=batch_size,
                        offload_activations=offload_activations)


class ContinualPruner:
    """Continual pruning of an in-memory model, one dataset at a time (library use)::

        pruner = ContinualPruner(model, method="copal", pattern="2:4")
        pruner.step(windows_a)          # int64 [n, seq_len] token ids; prunes ``model`` in place
        pruner.step(windows_b)
        pruner.save_state("state.safetensors", datasets=["a", "b"])

    ``model``: a LLaMA-family ``PreTrainedModel`` (LLaMA, Mistral, Qwen2), on the host. A host
    copy of its dense weights is kept for every protocol but cascade (restart, joint and COPAL
    start each step from W0); joint also keeps every step's windows. COPAL keeps only its state.
    """

    def __init__(self, model, *, method: str = "copal", protocol: Optional[str] = None,
                 pattern: str = "50%", device="cpu", batch_size="auto",
                 offload_activations: bool = False, **copal_options):
        protocol = protocol or ("continual" if method == "copal" else "restart")
        self.spec = RunSpec(method, protocol, pattern, **copal_options)
        self.pattern = Pattern.parse(pattern)
        self.lm = LayeredModel.from_model(model)
        self.dense = None if protocol == "cascade" else DenseWeights.snapshot(self.lm)
        self.history: Dict[str, LayerHistory] = {}
        self.joint_windows: List[torch.Tensor] = []  # joint only: every step's windows
        self.steps = 0
        self.window_shape = None
        self.options = dict(device=device, batch_size=batch_size, offload=offload_activations)

    def step(self, windows: torch.Tensor, desc: Optional[str] = None) -> None:
        """Prune the model in place for one more dataset; ``windows``: int64 [n, seq_len]."""
        if windows.dim() != 2 or windows.shape[0] == 0 or windows.dtype != torch.long:
            raise ValueError(f"windows must be int64 [n >= 1, seq_len], got {windows.dtype} "
                             f"{list(windows.shape)}")
        self.steps += 1
        self.window_shape = tuple(windows.shape)
        if self.spec.protocol == "joint":
            self.joint_windows.append(windows)
            windows = torch.cat(self.joint_windows)
        prune_step(self.lm, self.dense, self.history, windows, self.pattern, self.spec,
                   desc=desc or f"{self.spec.label} step {self.steps}", **self.options)

    def save_state(self, path, *, datasets: List[str], seed: Optional[int] = None) -> Path:
        """COPAL's state after the steps so far (``datasets``: their names, in order)."""
        if self.spec.method != "copal" or not self.history:
            raise ValueError("only a COPAL pruner with at least one step has a state")
        return save_state(path, self.history, state_metadata(
            getattr(self.lm.model.config, "_name_or_path", ""), datasets, self.spec,
            num_calibration=self.window_shape[0], seq_len=self.window_shape[1], seed=seed))
