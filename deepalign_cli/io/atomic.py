"""Atomic writes: a killed stage leaves the old file or none, never half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import DeepAlignError

_UMASK = os.umask(0)
os.umask(_UMASK)


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
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared on clusters
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


@contextlib.contextmanager
def staged_dir(final: Path | str):
    """Yield a temporary folder beside `final`; on success it replaces `final` (old one removed),
    on failure it is deleted. A stage that writes several files thus appears whole or not at all."""
    import shutil

    final = Path(final)
    if final.exists() and not final.is_dir():
        raise DeepAlignError(f"{final}: exists and is not a folder; move it away (the stage writes its outputs there)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as e:
        raise DeepAlignError(f"{final}: cannot create output folder ({e.strerror})")
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        try:
            _swap_in(tmp, final)
        except OSError as e:
            raise DeepAlignError(f"{final}: cannot replace the output folder ({e.strerror})")
    except DeepAlignError as e:  # name the final path, not the hidden temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeepAlignError(str(e).replace(str(tmp), str(final))) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename folder `tmp` onto `final`; an existing `final` is removed only once `tmp` is in place."""
    import shutil

    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old.{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
