"""Atomic file writes: a reader of ``path`` sees the old file or the whole new one, never a
half-written one, and a failed write leaves nothing behind."""

import os
from pathlib import Path
from typing import Callable


def user_mode(path, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open`` or ``mkdir`` would under the user's umask (files
    from ``mkstemp``/``mkdtemp`` and safetensors' writer are private, 0600/0700, whatever it is)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def write_atomically(path, write: Callable[[str], None]) -> Path:
    """Call ``write(name)`` with a hidden temporary name beside ``path`` (its folder is created if
    missing), then rename that file onto ``path``. On any error the temporary file is removed,
    ``path`` is left as it was, and the error propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
