"""Atomic writes: a killed stage leaves the old file or none, never half a file."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

from ..errors import DeepAlignError

_UMASK = os.umask(0)
os.umask(_UMASK)

# Temporary paths being written. A name is registered *before* the file or folder is created and
# forgotten only once it has been renamed or removed, so an interrupt at any point (a signal
# handler raises between any two bytecodes) leaves it here for remove_pending().
_PENDING: set[Path] = set()


def remove_pending() -> None:
    """Delete every temporary file/folder of an unfinished atomic write (call on interrupt)."""
    for tmp in list(_PENDING):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        _PENDING.discard(tmp)


def _temp_name(parent: Path, stem: str, suffix: str) -> Path:
    return parent / f".{stem}.{secrets.token_hex(6)}{suffix}"


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
    tmp = _temp_name(path.parent, path.stem, f".tmp{suffix}")
    _PENDING.add(tmp)
    try:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies: shared on clusters
        except OSError as e:
            raise DeepAlignError(f"{path.parent}: cannot write output ({e.strerror})")
        yield tmp
        os.replace(tmp, path)
        _PENDING.discard(tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        _PENDING.discard(tmp)
        raise DeepAlignError(f"{path}: cannot write ({e.strerror})")
    except BaseException:
        tmp.unlink(missing_ok=True)
        _PENDING.discard(tmp)
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

    final = Path(final)
    if final.exists() and not final.is_dir():
        raise DeepAlignError(f"{final}: exists and is not a folder; move it away (the stage writes its outputs there)")
    tmp = _temp_name(final.parent, final.name, ".tmp")
    _PENDING.add(tmp)
    try:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir(0o777)  # umask applies
        except OSError as e:
            raise DeepAlignError(f"{final}: cannot create output folder ({e.strerror})")
        yield tmp
        try:
            _swap_in(tmp, final)
        except OSError as e:
            raise DeepAlignError(f"{final}: cannot replace the output folder ({e.strerror})")
        _PENDING.discard(tmp)
    except DeepAlignError as e:  # name the final path, not the hidden temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        _PENDING.discard(tmp)
        raise DeepAlignError(str(e).replace(str(tmp), str(final))) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _PENDING.discard(tmp)
        raise


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename folder `tmp` onto `final`; an existing `final` is removed only once `tmp` is in place."""

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
