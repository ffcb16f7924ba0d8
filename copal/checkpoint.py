"""Hugging Face checkpoints on disk: read tensors lazily from safetensors shards, write a pruned
model shard by shard, atomically. The input directory is only ever read."""

import hashlib
import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import user_mode, write_atomically
from .outputs import WorkDir, check_output_dir, replace_directory

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# the float dtypes of safetensors headers
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                      "F16": torch.float16}
# files of a checkpoint that hold weights (never copied to a pruned output: it has its own)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                   ".onnx", ".npz")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked (missing, corrupt, already taken)."""


def _read_weight_map(index: Path) -> Dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{index}: not a valid JSON index ({error})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index}: no \"weight_map\" in the index") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: \"weight_map\" must map tensor names to shard files")
    outside = sorted({s for s in weight_map.values() if Path(s).name != s})
    if outside:
        raise CheckpointError(f"{index}: shard names must be file names in the checkpoint, got "
                              f"{', '.join(outside)}")
    return weight_map


class ShardReader:
    """Which shard holds which tensor, and reading single tensors on demand (the whole model is
    never loaded)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise CheckpointError(f"{self.directory}: no config.json, not a Hugging Face checkpoint")
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = _read_weight_map(index)
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
        self._headers: Optional[Dict[str, tuple]] = None

    def headers(self) -> Dict[str, tuple]:
        """{name: (torch dtype or the header's dtype name, shape)} of every tensor, from the
        shards' headers (no data is read; each shard is opened once)."""
        if self._headers is None:
            headers = {}
            for shard in sorted(set(self.weight_map.values())):
                with self._open(shard) as handle:
                    for name in handle.keys():
                        view = handle.get_slice(name)
                        dtype = view.get_dtype()
                        headers[name] = (SAFETENSORS_DTYPES.get(dtype, dtype), tuple(view.get_shape()))
            self._headers = headers
        return self._headers

    def tensor_digests(self, names: Iterable[str]) -> Dict[str, str]:
        """{name: :func:`tensor_digest`} of the named tensors, hashing each shard they are in
        once (then cached while the file is unchanged)."""
        names = list(names)
        digests = {}
        for shard in self._by_shard(names):
            def read_all(shard=shard):
                with self._open(shard) as handle:
                    return {name: tensor_digest(handle.get_tensor(name)) for name in handle.keys()}

            digests.update(_shard_digests(self.directory / shard, read_all))
        return {name: digests[name] for name in names}

    def _open(self, shard):
        try:
            return safe_open(str(self.directory / shard), framework="pt")
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{self.directory / shard}: unreadable shard ({error})") from error

    def names(self) -> List[str]:
        return list(self.weight_map)

    def _by_shard(self, names: Iterable[str]) -> Dict[str, List[str]]:
        by_shard: Dict[str, List[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"{self.directory}: tensor {name!r} is in no shard")
            by_shard.setdefault(self.weight_map[name], []).append(name)
        return by_shard

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """Read the named tensors (host memory), opening each shard once."""
        tensors = {}
        for shard, shard_names in self._by_shard(names).items():
            with self._open(shard) as handle:
                for name in shard_names:
                    try:
                        tensors[name] = handle.get_tensor(name)
                    except Exception as error:
                        raise CheckpointError(
                            f"{self.directory / shard}: cannot read {name!r} ({error})"
                        ) from error
        return tensors


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's shape and values as fp32 (exact for fp16/bf16), whatever its dtype."""
    values = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(list(values.shape)).encode())
    digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return digest.hexdigest()


def _shard_digests(path: Path, read_all) -> Dict[str, str]:
    """{tensor: tensor_digest} of one shard, cached under ``$COPAL_HOME`` by the file's identity
    on disk (device, inode, size, modification and change times: a rewrite, copy or swap changes
    the change time), so a model is hashed once, not at every verb."""
    from .data import cache_dir  # data imports nothing of the checkpoint layer

    stat = path.stat()
    identity = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    cache = cache_dir() / "digests" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
                                       + ".json")
    try:
        cached = json.loads(cache.read_text())
        if cached["identity"] == identity:
            return cached["tensors"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tensors = read_all()
    write_atomically(cache, lambda name: Path(name).write_text(
        json.dumps({"identity": identity, "tensors": tensors})))
    return tensors


def read_config_json(directory) -> dict:
    """The parsed config.json of a checkpoint directory, or a one-line CheckpointError."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json, not a Hugging Face checkpoint") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a valid JSON config ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


def copy_non_weights(source: Path, target: Path, skip=()) -> List[str]:
    """Copy every top-level file of checkpoint ``source`` that holds no weights (config,
    generation config, tokenizer, chat template, model card, ...) into ``target``, as it is:
    a pruned copy reads exactly as its input does. Returns the names copied."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        name = path.name
        if (not path.is_file() or name.startswith(".") or name == INDEX_NAME or name in skip
                or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")):
            continue
        shutil.copy2(path, Path(target) / name)
        copied.append(name)
    return copied


class ShardWriter:
    """Writes a checkpoint shard by shard into a hidden staging folder beside ``directory`` and
    moves it into place on :meth:`finish`, so a reader never sees half a model.

    Shards are named ``model-00001-of-0000N.safetensors`` with N fixed up front (one shard per
    decoder block plus one for everything else), and an index maps every tensor to its shard.
    The staging folder is a :class:`copal.outputs.WorkDir`: a writer that is killed leaves it
    behind unclaimed, and the next writer beside it removes it.
    """

    STAGING_PREFIX = ".{name}.copal-staging-"

    def __init__(self, directory, num_shards: int, *, overwrite: bool = False, protect=()):
        """``protect``: input directories that the output may neither be, lie inside, nor
        contain. Raises :class:`copal.outputs.OutputError` (see
        :func:`copal.outputs.check_output_dir`)."""
        self.directory = check_output_dir(directory, overwrite=overwrite, protect=protect)
        self.overwrite, self.protect = overwrite, list(protect)
        self.work = WorkDir(self.directory.parent,
                            self.STAGING_PREFIX.format(name=self.directory.name))
        self.staging = self.work.path
        user_mode(self.staging, folder=True)
        self.num_shards = num_shards
        self.weight_map: Dict[str, str] = {}
        self.total_size = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._pending: Optional[Future] = None

    @staticmethod
    def _save(tensors: Dict[str, torch.Tensor], path: Path) -> None:
        save_file(tensors, str(path), metadata={"format": "pt"})
        user_mode(path)

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
        self._pending = self._writer.submit(self._save, host, self.staging / name)
        for key, value in host.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a failed write raises here

    def finish(self, save_extra) -> Path:
        """Write the index, let ``save_extra(staging_dir)`` add config, tokenizer, marker and
        anything else, then move the staging folder into place (an old output, checked to be
        this project's, is removed only once the new one is there)."""
        self._wait()
        self._writer.shutdown()
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=2))
        save_extra(self.staging)
        # checked again: the output may have changed during a long run
        check_output_dir(self.directory, overwrite=self.overwrite, protect=self.protect)
        replace_directory(self.staging, self.directory)
        self.work.release(remove=False)
        return self.directory

    def abort(self) -> None:
        try:
            self._wait()
        except Exception:
            pass  # the staging folder goes anyway
        self._writer.shutdown()
        self.work.release()
