"""Resumable chunk store: the finished chunks of an interrupted stage, kept for `--resume`.

A stage that works through its input in fixed chunks saves each finished chunk atomically to
STAGE_DIR/.partial/DIGEST/chunk_XXXXX.npz, DIGEST being the first DIGEST_CHARS hex digits of a
hash of everything that shapes the result (see :func:`array_digest`). A rerun with the same
settings finds the same folder and loads the chunks back instead of recomputing them; other
settings get another folder, so a chunk is never reused for different work. The stage removes its
folder (:meth:`ChunkStore.remove`) once its outputs are written.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_write

PARTIAL = ".partial"
DIGEST_CHARS = 16  # partial-results folder name: this many hex digits of the settings digest


def array_digest(a) -> bytes:
    """sha256 of an array's dtype, shape and bytes (a part of a settings digest)."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str((a.dtype, a.shape)).encode() + a.tobytes()).digest()


class ChunkStore:
    """The saved chunks of one piece of work, in `folder` (created on the first save)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def for_stage(cls, stage_dir: Path, digest: str, resume: bool) -> ChunkStore:
        """The store of the work identified by the hex `digest` under stage_dir/.partial/; its
        earlier chunks are deleted unless `resume`."""
        store = cls(Path(stage_dir) / PARTIAL / digest[:DIGEST_CHARS])
        if not resume:
            store.remove()
        return store

    def path(self, k: int) -> Path:
        return self.folder / f"chunk_{k:05d}.npz"

    def save(self, k: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Chunk k's named arrays, written atomically (a killed save leaves no chunk file)."""
        with atomic_write(self.path(k)) as tmp:
            np.savez(tmp, **arrays)

    def load(self, k: int, names: Sequence[str], **expected: np.ndarray) -> dict | None:
        """Chunk k's arrays `names` when the chunk is saved, readable, and each array of `expected`
        equals the saved one of that name (e.g. the rows it covers); None otherwise (recompute)."""
        path = self.path(k)
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                saved = {name: z[name] for name in (*names, *expected)}
        except (OSError, ValueError, KeyError):
            return None
        return saved if all(np.array_equal(saved[name], a) for name, a in expected.items()) else None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
