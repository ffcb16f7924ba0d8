"""COPAL's continual state: per layer the vectors of every step (t x (in + out) floats, nothing
weight-sized), saved as safetensors with its metadata, so that a later dataset can be added in
another process without any past data. The OBS variant's state is the metadata file alone, with
its second-order blocks in the folder beside it (copal.hessian)."""

import json
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import write_atomically
from .methods import OBS_DEFAULTS, LayerHistory

FORMAT = "copal-state/1"
# what `copal continue` needs to redo a step the same way: the dense model (where it was, and
# what identifies it wherever it is now), the datasets so far, the exact pattern, COPAL's options
# and the calibration windows' definition
METADATA_KEYS = ("model", "model_fingerprint", "datasets", "pattern", "gradient", "aggregation",
                 "normalisation", "group", "step_weights", "weight_update", "step_weighting",
                 "dampening", "block_size", "num_calibration", "seq_len", "seed", "dtype",
                 "batch_size", "hessian_id", "calibration_inputs")
# keys that states written before the OBS update lack: they were all mask-only
MASK_ONLY_DEFAULTS = {"weight_update": "none", **OBS_DEFAULTS, "hessian_id": None}


def _missing_keys(metadata: dict) -> list:
    return [key for key in METADATA_KEYS if key not in metadata]


def _tensors(history: Dict[str, LayerHistory]) -> Dict[str, torch.Tensor]:
    tensors = {}
    for key, layer in history.items():
        tensors[f"{key}.grads"] = torch.stack(layer.grads).contiguous()
        tensors[f"{key}.acts"] = torch.stack(layer.acts).contiguous()
    return tensors


def _history(handle) -> Dict[str, LayerHistory]:
    history: Dict[str, LayerHistory] = {}
    for name in handle.keys():
        key, kind = name.rsplit(".", 1)
        layer = history.setdefault(key, LayerHistory([], []))
        rows = list(handle.get_tensor(name).unbind(0))
        if kind == "grads":
            layer.grads = rows
        else:
            layer.acts = rows
    return history


def save_history(path, history: Dict[str, LayerHistory]) -> Path:
    """The vectors alone (a run's checkpoint between steps), written atomically."""
    tensors = _tensors(history)
    return write_atomically(path, lambda name: save_file(tensors, name))


def load_history(path) -> Dict[str, LayerHistory]:
    with safe_open(str(path), framework="pt") as handle:
        return _history(handle)


def save_state(path, history: Dict[str, LayerHistory], metadata: dict) -> Path:
    """Write atomically: ``<layer>.grads`` [T, out] and ``<layer>.acts`` [T, in] fp32, and
    ``metadata`` (every key of :data:`METADATA_KEYS`) as JSON in the header."""
    path = Path(path)
    missing = _missing_keys(metadata)
    if missing:
        raise ValueError(f"COPAL state metadata lacks {', '.join(missing)}")
    tensors = _tensors(history)
    header = {"format": FORMAT, "metadata": json.dumps(metadata)}
    return write_atomically(path, lambda name: save_file(tensors, name, metadata=header))


def is_state_file(path) -> bool:
    """True for a file that :func:`save_state` wrote."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except (OSError, SafetensorError, ValueError):
        return False


def load_state(path) -> Tuple[Dict[str, LayerHistory], dict]:
    """(history, metadata) from :func:`save_state`'s file; a file that is not one, or lacks
    metadata, raises ValueError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a COPAL state file (it is a .safetensors "
                         "file, copal-state.safetensors in a pruned checkpoint)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such COPAL state file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path}: not a COPAL state file (format {header.get('format')!r})")
            history = _history(handle)
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable COPAL state file ({error})") from error
    try:
        metadata = json.loads(header["metadata"])
    except (KeyError, ValueError):
        raise ValueError(f"{path}: the state's metadata is missing or not JSON") from None
    if "weight_update" not in metadata:
        metadata = {**MASK_ONLY_DEFAULTS, **metadata}
    missing = _missing_keys(metadata)
    if missing:
        raise ValueError(f"{path}: the state's metadata lacks {', '.join(missing)}; it cannot be "
                         "continued (written by an older copal?)")
    if metadata["weight_update"] == "obs":  # its state is the second-order blocks beside it
        if history or not metadata["hessian_id"]:
            raise ValueError(f"{path}: an OBS state with importance vectors or without its "
                             "second-order blocks' identifier; it is inconsistent")
        return history, metadata
    steps = {len(layer.acts) for layer in history.values()} | {
        len(layer.grads) for layer in history.values()}
    if steps != {len(metadata["datasets"])}:
        raise ValueError(f"{path}: the state holds {sorted(steps)} step(s) per layer for "
                         f"{len(metadata['datasets'])} dataset(s); it is inconsistent")
    return history, metadata
