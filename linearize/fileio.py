"""Atomic file writes: a temporary file in the same folder, flushed to disk, then renamed over the target.

`tempfile` creates files 0600 and folders 0700; whatever outlives its temporary name gets the usual permissions
(0666 or 0777 less the umask), as a plain `open` or `mkdir` would have given it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere the umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """The mode `open` (0666) or `mkdir` (0777) gives under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def give_usual_modes(folder: str | Path) -> None:
    """chmod `folder` and everything below it to the modes a plain `open` or `mkdir` gives (for folders just
    written through `tempfile`, or by libraries that write through it, as transformers does its safetensors)."""
    file_mode, dir_mode = usual_mode(), usual_mode(directory=True)
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a binary handle; `path` then holds either its old contents or the new ones, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, usual_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
