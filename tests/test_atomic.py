"""Atomic writes: whole files or none, also when an interrupt lands at any point of the write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepalign_cli.errors import DeepAlignError
from deepalign_cli.io import atomic


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_success_renames_and_keeps_the_umask_mode(tmp_path):
    target = tmp_path / "out" / "a.npz"
    with atomic.atomic_write(target) as tmp:
        assert tmp.name.startswith(".a.") and tmp.name.endswith(".tmp.npz") and tmp.exists()
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x" and _hidden(target.parent) == [] and not atomic._PENDING
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_write(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and _hidden(tmp_path) == [] and not atomic._PENDING


def test_interrupt_during_cleanup_leaves_the_temp_file_to_remove_pending(tmp_path, monkeypatch):
    """The signal handler raises between any two bytecodes, also inside the cleanup of a failed
    write: the temporary name stays registered until it is gone, and remove_pending() (what
    train/align call on Ctrl-C or SIGTERM) deletes it."""
    target = tmp_path / "chunk.npz"
    real_unlink = Path.unlink

    def interrupted_unlink(self, missing_ok=False):
        monkeypatch.setattr(Path, "unlink", real_unlink)  # the second signal lands once only
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            monkeypatch.setattr(Path, "unlink", interrupted_unlink)
            raise KeyboardInterrupt
    assert len(_hidden(tmp_path)) == 1 and len(atomic._PENDING) == 1
    atomic.remove_pending()
    assert _hidden(tmp_path) == [] and not atomic._PENDING and not target.exists()


def test_staged_dir_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "stage"
    with atomic.staged_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (final / "a.txt").read_text() == "1"
    with pytest.raises(DeepAlignError, match=str(final)):
        with atomic.staged_dir(final) as tmp:
            (tmp / "a.txt").write_text("2")
            raise DeepAlignError(f"{tmp}: failed")
    assert (final / "a.txt").read_text() == "1" and _hidden(tmp_path) == [] and not atomic._PENDING
