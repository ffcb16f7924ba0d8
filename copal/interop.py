"""Checkpoint files that transformers 4.x and 5.x read the same.

Transformers 5 writes the rotary base only inside ``rope_parameters`` and names its tokenizer
class ``TokenizersBackend``. Transformers 4.57 reads neither: it silently falls back to a rotary
base of 10000 (a wrong model, no error) and refuses the tokenizer. :func:`make_portable` adds
the keys that 4.x reads, derived from 5.x's and equal to them, so both versions build the same
model and tokenizer (tests/driver/test_interop.py: the same logits); 5.x reads the added keys
back to the same values. Config keys already present are never changed.
"""

import json
from pathlib import Path
from typing import List

from .atomic import write_atomically

# transformers 5's name for a tokenizer built from tokenizer.json alone; 4.x's (and 5.x's) is
FAST_TOKENIZER = "PreTrainedTokenizerFast"


def portable_config(config: dict) -> dict:
    """``config`` (config.json's content) with transformers 4.x's keys added: ``rope_theta`` (and
    ``rope_local_base_freq`` for per-layer-type parameters, as Gemma 3's), ``rope_scaling``
    where the rotary type is not the default one, ``torch_dtype`` beside ``dtype``, and the
    expert count under both of its names."""
    config = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope:
        if all(isinstance(value, dict) for value in rope.values()):  # per layer type
            local = rope.get("sliding_attention", {}).get("rope_theta")
            if local is not None:
                config.setdefault("rope_local_base_freq", local)
            rope = rope.get("full_attention", next(iter(rope.values())))
        if rope.get("rope_theta") is not None:
            config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    # transformers 5 writes Qwen-MoE's expert count as num_local_experts, which 4.x's Qwen
    # configs do not read (they fall back to 128 experts); Mixtral's 4.x reads that name
    for name, other in (("num_local_experts", "num_experts"), ("num_experts", "num_local_experts")):
        if config.get(name) is not None:
            config.setdefault(other, config[name])
    return config


def portable_tokenizer_config(config: dict) -> dict:
    """tokenizer_config.json's content with a class both versions know, where 5.x wrote its own
    name for a tokenizer that tokenizer.json describes whole."""
    if config.get("tokenizer_class") == "TokenizersBackend":
        return dict(config, tokenizer_class=FAST_TOKENIZER)
    return config


def make_portable(directory) -> List[str]:
    """Rewrite ``directory``'s config.json and tokenizer_config.json (atomically) where
    transformers 4.x would read them otherwise than 5.x; returns the names rewritten. The
    tokenizer class is changed only where tokenizer.json is there."""
    directory = Path(directory)
    changed = []
    files = [("config.json", portable_config)]
    if (directory / "tokenizer.json").is_file():
        files.append(("tokenizer_config.json", portable_tokenizer_config))
    for name, convert in files:
        path = directory / name
        if not path.is_file():
            continue
        content = json.loads(path.read_text())
        portable = convert(content)
        if portable != content:
            text = json.dumps(portable, indent=2, ensure_ascii=False) + "\n"
            write_atomically(path, lambda tmp: Path(tmp).write_text(text))
            changed.append(name)
    return changed
