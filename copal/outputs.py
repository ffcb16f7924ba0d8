"""Where the verbs write, and what they may remove.

Nothing the user did not ask to destroy is ever removed:

- an output path that is empty, the working directory or one of its parents, a home directory, a
  filesystem root or a mount point is refused outright;
- ``overwrite`` replaces only a directory that this project wrote (it holds :data:`MARKER`), and
  only after the new one is complete;
- an output file that exists is replaced only with ``overwrite``, and only if it is one of this
  project's files (the caller says how to recognise it).

Work folders (a checkpoint's staging folder, an experiment's scratch blocks) are claimed with a
lock file beside them that their process holds (``flock``) while it lives. A process killed even
by SIGKILL releases the lock, so the next run that looks finds the folder unclaimed and removes it.
"""

import json
import os
import pwd
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

try:
    import fcntl
except ImportError:  # not on Windows: work folders are then never judged abandoned
    fcntl = None

# written into every checkpoint this project writes: what made it (and that it is ours)
MARKER = "copal-checkpoint.json"
MARKER_FORMAT = "copal-checkpoint/1"
LOCK_SUFFIX = ".lock"


class OutputError(RuntimeError):
    """An output location that cannot be written, or could only be written by destroying
    something the user did not ask to destroy."""


def _homes() -> set:
    homes = {Path.home().resolve()}
    try:
        homes.update(Path(entry.pw_dir).resolve() for entry in pwd.getpwall() if entry.pw_dir)
    except (OSError, KeyError):
        pass
    return homes


def refuse_dangerous(path, what: str) -> Path:
    """``path`` resolved, or :class:`OutputError` if it is a place no output may ever replace."""
    if path is None or not str(path).strip():
        raise OutputError(f"{what} is an empty path (an unset shell variable?)")
    resolved = Path(path).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"{what} {path} is the working directory or one of its parents; "
                          "name a new directory")
    if resolved == Path(resolved.anchor) or resolved in _homes():
        raise OutputError(f"{what} {path} is a filesystem root or a home directory; name a new "
                          "directory")
    if resolved.exists() and os.path.ismount(resolved):
        raise OutputError(f"{what} {path} is a mount point; name a directory inside it")
    return resolved


def _inside(path: Path, protect: Iterable) -> Optional[Path]:
    for kept in protect:
        source = Path(kept).resolve()
        if path == source or source in path.parents or path in source.parents:
            return Path(kept)
    return None


def probe_writable(directory: Path, what: str) -> None:
    """Create and remove a file in ``directory`` or its nearest existing ancestor: a read-only
    filesystem or a missing permission shows here, before any work (OutputError)."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what}: {probe} is a file, not a directory")
    try:
        handle, name = tempfile.mkstemp(prefix=".copal-probe-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise OutputError(f"{what}: cannot write in {probe} ({error.strerror or error})") from None


def check_output_dir(path, *, overwrite: bool, protect: Iterable = (), what: str = "output") -> Path:
    """Refuse, before any work, an output directory that cannot be written or replaced.

    ``protect``: input directories that the output may neither be, lie inside, nor contain.
    Returns the resolved path. Raises :class:`OutputError`."""
    target = refuse_dangerous(path, what)
    kept = _inside(target, protect)
    if kept is not None:
        raise OutputError(f"{what} {path} would overwrite or sit inside the input {kept}; "
                          "choose an output directory outside it")
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"{what} {path} is a file, not a directory")
        if any(target.iterdir()):
            if not overwrite:
                raise OutputError(f"{what} {path} already exists and is not empty; choose another "
                                  "output directory or pass --overwrite")
            if not is_project_checkpoint(target):
                raise OutputError(
                    f"{what} {path} is not empty and holds no checkpoint written by copal (no "
                    f"{MARKER}); --overwrite only replaces copal's own outputs")
    probe_writable(target.parent, what)
    return target


def check_output_file(path, *, overwrite: bool, protect: Iterable = (), what: str,
                      is_ours: Callable[[Path], bool]) -> Path:
    """Refuse, before any work, an output file that exists (without ``overwrite``, or that is
    not one of ours), lies in a protected input, or cannot be written."""
    if path is None or not str(path).strip():
        raise OutputError(f"{what} is an empty path (an unset shell variable?)")
    target = Path(path).expanduser().resolve()
    kept = _inside(target, protect)
    if kept is not None:
        if target == Path(kept).resolve():
            raise OutputError(f"{what} {path} is an input of this run; choose another path")
        raise OutputError(f"{what} {path} lies inside the input {kept}; choose a path outside it")
    if target.is_dir():
        raise OutputError(f"{what} {path} is a directory, not a file")
    if target.exists():
        if not overwrite:
            raise OutputError(f"{what} {path} already exists; choose another path or pass "
                              "--overwrite")
        if not is_ours(target):
            raise OutputError(f"{what} {path} exists and was not written by copal; --overwrite "
                              "only replaces copal's own files")
    probe_writable(target.parent, what)
    return target


def is_project_checkpoint(directory) -> bool:
    marker = Path(directory) / MARKER
    try:
        return json.loads(marker.read_text()).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_marker(directory, provenance: dict) -> None:
    """Mark ``directory`` as this project's checkpoint, with what made it."""
    text = json.dumps({"format": MARKER_FORMAT, **provenance}, indent=1, default=str)
    (Path(directory) / MARKER).write_text(text + "\n")


class WorkDir:
    """A hidden work folder ``<parent>/<prefix><random>``, claimed by this process through the
    lock file beside it (``<folder>.lock``) for as long as it lives or until :meth:`release`."""

    def __init__(self, parent, prefix: str):
        parent = Path(parent)
        parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(parent, prefix)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.lock = self.path.with_name(self.path.name + LOCK_SUFFIX)
        self._handle = open(self.lock, "w")
        if fcntl is not None:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._handle.write(f"{os.getpid()}\n")
        self._handle.flush()

    def release(self, remove: bool = True) -> None:
        """Remove the folder (unless ``remove`` is false: it was moved away) and the lock."""
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self.lock.unlink(missing_ok=True)


def remove_abandoned(parent, prefix: str) -> list:
    """Remove the work folders ``<parent>/<prefix>*`` whose lock no living process holds (their
    process was killed); returns what was removed. Folders without a lock file are left alone."""
    removed = []
    if fcntl is None or not Path(parent).is_dir():
        return removed
    pattern = re.compile(re.escape(prefix) + r".+" + re.escape(LOCK_SUFFIX) + "$")
    for lock in Path(parent).iterdir():
        if not pattern.fullmatch(lock.name) or not lock.is_file():
            continue
        try:
            with open(lock, "r+") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a living process holds it
                folder = lock.with_name(lock.name[: -len(LOCK_SUFFIX)])
                shutil.rmtree(folder, ignore_errors=True)
                lock.unlink(missing_ok=True)
                removed.append(folder)
        except OSError:
            continue
    return removed


def replace_directory(staging: Path, directory: Path) -> None:
    """Move the complete ``staging`` folder to ``directory``; an old ``directory`` (already
    checked to be ours) is moved aside first and removed only once the new one is in place."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.replaced-", dir=directory.parent))
        os.replace(directory, old / "old")
    try:
        os.replace(staging, directory)
    except BaseException:
        if old is not None:
            os.replace(old / "old", directory)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
