"""Writing the files a crash must never leave half-written: a privacy ledger, a run
checkpoint, a revocation list."""

from __future__ import annotations

import os
from pathlib import Path


def replace_atomically(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` so that a crash or a failed write leaves either the old
    file or the new one.

    The bytes go to a hidden temporary file beside ``path`` and reach the disk before
    that file is renamed over ``path``; the folder is synced last, so the rename itself
    survives a power cut.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
