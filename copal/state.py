"""COPAL's continual state: per layer the normalised vectors of every step (t x (in + out)
floats, nothing weight-sized), saved as safetensors with its metadata, so that a later dataset
can be added in another process without any past data."""

import json
import os
from pathlib import Path
from typing import Dict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .methods import LayerHistory

FORMAT = "copal-state/1"


def save_state(path, history: Dict[str, LayerHistory], metadata: dict) -> Path:
    """Write atomically: ``<layer>.grads`` [T, out] and ``<layer>.acts`` [T, in] fp32, and
    ``metadata`` (datasets, pattern, options, dense model) as JSON in the header."""
    path = Path(path)
    tensors = {}
    for key, layer in history.items():
        tensors[f"{key}.grads"] = torch.stack(layer.grads).contiguous()
        tensors[f"{key}.acts"] = torch.stack(layer.acts).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "metadata": json.dumps(metadata)})
    os.replace(tmp, path)
    return path


def load_state(path):
    """(history, metadata) from :func:`save_state`'s file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such COPAL state file")
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
    return history, json.loads(header["metadata"])
