"""The user's verbs as Python functions: prune a checkpoint, continue a COPAL-pruned model with a
new dataset, evaluate. Checkpoints are streamed block by block: read lazily from the input's
shards, written shard by shard into a staging directory that replaces the output at the end."""

from pathlib import Path
from typing import Dict, List, Optional

from transformers import AutoConfig, AutoTokenizer

from .assets import resolve_model
from .checkpoint import ShardWriter
from .data import make_dataset
from .evaluate import perplexities
from .continual import copal_method
from .methods import DEFAULT_AGGREGATION, LayerHistory, Pattern, make_method
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
                     batch_size="auto", dtype="auto", gradient: str = "lm",
                     aggregation: str = DEFAULT_AGGREGATION, normalisation: str = "mean",
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
        save_state(state_path, history, {
            "model": str(Path(model_dir).resolve()), "datasets": [data], "pattern": str(parsed),
            "gradient": gradient, "aggregation": aggregation, "normalisation": normalisation,
            "group": group, "step_weights": None, "num_calibration": num_calibration,
            "seq_len": seq_len, "seed": seed})
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
