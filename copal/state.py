"""COPAL's continual state: per layer the normalised vectors of every step (t x (in + out)
floats, nothing weight-sized), saved as safetensors with its metadata, so that a later dataset
can be added in another process without any past data."""

import json
from pathlib import Path
from typing import Dict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import write_atomically
from .methods import LayerHistory

FORMAT = "copal-state/1"
# what `copal continue` needs to redo a step the same way: the dense model, the datasets so far,
# the pattern, COPAL's options and the calibration windows' definition
METADATA_KEYS = ("model", "datasets", "pattern", "gradient", "aggregation", "normalisation",
                 "group", "step_weights", "num_calibration", "seq_len", "seed")


def _missing_keys(metadata: dict) -> list:
    return [key for key in METADATA_KEYS if key not in metadata]


def save_state(path, history: Dict[str, LayerHistory], metadata: dict) -> Path:
    """Write atomically: ``<layer>.grads`` [T, out] and ``<layer>.acts`` [T, in] fp32, and
    ``metadata`` (every key of :data:`METADATA_KEYS`) as JSON in the header."""
    path = Path(path)
    missing = _missing_keys(metadata)
    if missing:
        raise ValueError(f"COPAL state metadata lacks {', '.join(missing)}")
    tensors = {}
    for key, layer in history.items():
        tensors[f"{key}.grads"] = torch.stack(layer.grads).contiguous()
        tensors[f"{key}.acts"] = torch.stack(layer.acts).contiguous()
    header = {"format": FORMAT, "metadata": json.dumps(metadata)}
    return write_atomically(path, lambda name: save_file(tensors, name, metadata=header))


def load_state(path):
    """(history, metadata) from :func:`save_state`'s file; a file that is not one, or lacks
    metadata, raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such COPAL state file")
    try:
        return _read_state(path)
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable COPAL state file ({error})") from error


def _read_state(path: Path):
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a COPAL state file (format {header.get('format')!r})")
        history: Dict[str, LayerHistory] = {}
        for name in handle.keys():
            key, kind = name.rsplit(".", 1)
            layer = history.setdefault(key, LayerHistory([], []))
            rows = list(handle.get_tensor(name).unbind(0))
            if kind == "grads":
                layer.grads = rows
            else:
                layer.acts = rows
    metadata = json.loads(header["metadata"])
    missing = _missing_keys(metadata)
    if missing:
        raise ValueError(f"{path}: the state's metadata lacks {', '.join(missing)}; it cannot be "
                         "continued (written by an older copal?)")
    return history, metadata
