"""Hugging Face checkpoints on disk: read tensors lazily from safetensors shards, write a pruned
model shard by shard, atomically. The input directory is only ever read."""

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked (missing, corrupt, already taken)."""


class ShardReader:
    """Which shard holds which tensor, and reading single tensors on demand (the whole model is
    never loaded)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise CheckpointError(f"{self.directory}: no config.json, not a Hugging Face checkpoint")
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_NAME).is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors are read)"
            )
        if weight_map is None:
            with self._open(SINGLE_NAME) as handle:
                weight_map = {name: SINGLE_NAME for name in handle.keys()}
        missing = sorted({s for s in weight_map.values() if not (self.directory / s).is_file()})
        if missing:
            raise CheckpointError(f"{self.directory}: missing shard(s) {', '.join(missing)}")
        self.weight_map: Dict[str, str] = weight_map

    def _open(self, shard):
        try:
            return safe_open(str(self.directory / shard), framework="pt")
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{self.directory / shard}: unreadable shard ({error})") from error

    def names(self) -> List[str]:
        return list(self.weight_map)

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """Read the named tensors (host memory), opening each shard once."""
        by_shard: Dict[str, List[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"{self.directory}: tensor {name!r} is in no shard")
            by_shard.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for shard, shard_names in by_shard.items():
            with self._open(shard) as handle:
                for name in shard_names:
                    try:
                        tensors[name] = handle.get_tensor(name)
                    except Exception as error:
                        raise CheckpointError(
                            f"{self.directory / shard}: cannot read {name!r} ({error})"
                        ) from error
        return tensors


def fingerprint(directory) -> str:
    """A short digest of a checkpoint's config and tensor index (which model this is)."""
    directory = Path(directory)
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for name in (INDEX_NAME, SINGLE_NAME):
        path = directory / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(str(path.stat().st_size).encode() if name == SINGLE_NAME else path.read_bytes())
    return digest.hexdigest()[:16]


class ShardWriter:
    """Writes a checkpoint shard by shard into a temporary directory beside ``directory`` and
    moves it into place on :meth:`finish`, so a reader never sees half a model.

    Shards are named ``model-00001-of-0000N.safetensors`` with N fixed up front (one shard per
    decoder block plus one for everything else), and an index maps every tensor to its shard.
    """

    def __init__(self, directory, num_shards: int, *, overwrite: bool = False, protect=()):
        """``protect``: input directories that the output may neither be, lie inside, nor
        contain (``overwrite`` would otherwise delete them)."""
        self.directory = Path(directory)
        target = self.directory.resolve()
        for kept in map(Path, protect):
            source = kept.resolve()
            if target == source or source in target.parents or target in source.parents:
                raise CheckpointError(
                    f"output {self.directory} would overwrite or sit inside the input {kept}; "
                    "choose an output directory outside it"
                )
        if self.directory.exists() and any(self.directory.iterdir()) and not overwrite:
            raise CheckpointError(
                f"{self.directory} already exists and is not empty; choose another output "
                "directory or pass overwrite"
            )
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.", dir=self.directory.parent))
        self.num_shards = num_shards
        self.weight_map: Dict[str, str] = {}
        self.total_size = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._pending: Optional[Future] = None

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def write_shard(self, index: int, tensors: Dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` to the host now (the caller may free them on return) and write the
        shard in the background while the caller goes on; at most one write waits, so the host
        holds at most two shards."""
        name = self.shard_name(index)
        host = {k: v.detach().to("cpu", copy=v.device.type == "cpu").contiguous()
                for k, v in tensors.items()}
        self._wait()
        self._pending = self._writer.submit(
            save_file, host, str(self.staging / name), metadata={"format": "pt"})
        for key, value in host.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a failed write raises here

    def write_file(self, relative: str, content: bytes) -> None:
        (self.staging / relative).write_bytes(content)

    def finish(self, save_extra) -> Path:
        """Write the index, let ``save_extra(staging_dir)`` add config/tokenizer, then move the
        staging directory into place."""
        self._wait()
        self._writer.shutdown()
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=2))
        save_extra(self.staging)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        os.replace(self.staging, self.directory)
        return self.directory

    def abort(self) -> None:
        try:
            self._wait()
        except Exception:
            pass  # the staging directory goes anyway
        self._writer.shutdown()
        shutil.rmtree(self.staging, ignore_errors=True)
