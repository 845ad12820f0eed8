"""Atomic writes: a killed stage leaves the old file or none, never half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import DeepAlignError


@contextlib.contextmanager
def atomic_write(path: Path | str, suffix: str | None = None):
    """Yield a temporary path in the same folder; on success it is renamed onto `path`.

    The temporary name keeps the final suffix (some writers, e.g. mrcfile/starfile, look at it).
    On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DeepAlignError(f"{path.parent}: cannot create output folder ({e.strerror})")
    suffix = suffix if suffix is not None else "".join(path.suffixes[-1:])
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as e:
        raise DeepAlignError(f"{path.parent}: cannot write output ({e.strerror})")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DeepAlignError(f"{path}: cannot write ({e.strerror})")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
