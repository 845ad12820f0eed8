"""io.chunks.ChunkStore: finished chunks saved atomically, loaded back only for the same work."""

import numpy as np

from deepalign_cli.io.chunks import DIGEST_CHARS, PARTIAL, ChunkStore, array_digest

NAMES = ("score", "region")


def _results(k):
    return {"score": np.arange(4, dtype=np.float32) + k, "region": np.full(4, k)}


def test_saved_chunk_loads_back_for_the_same_rows(tmp_path):
    store = ChunkStore.for_stage(tmp_path, "ab" * 32, resume=False)
    rows = np.array([3, 1, 2, 0])
    store.save(0, {"local": rows, **_results(0)})
    assert store.folder == tmp_path / PARTIAL / ("ab" * 32)[:DIGEST_CHARS]
    assert store.path(0).name == "chunk_00000.npz"
    got = ChunkStore.for_stage(tmp_path, "ab" * 32, resume=True).load(0, NAMES, local=rows)
    assert set(got) == {"local", *NAMES}
    assert np.array_equal(got["score"], _results(0)["score"]) and np.array_equal(got["local"], rows)


def test_other_rows_missing_or_damaged_chunks_are_recomputed(tmp_path):
    store = ChunkStore.for_stage(tmp_path, "cd" * 32, resume=False)
    store.save(0, {"local": np.arange(4), **_results(0)})
    assert store.load(0, NAMES, local=np.arange(1, 5)) is None  # another chunking
    assert store.load(1, NAMES, local=np.arange(4)) is None  # never saved
    assert store.load(0, ("score", "missing"), local=np.arange(4)) is None
    store.path(0).write_bytes(b"not an npz")
    assert store.load(0, NAMES, local=np.arange(4)) is None


def test_a_run_without_resume_starts_empty_and_remove_deletes_the_folder(tmp_path):
    store = ChunkStore.for_stage(tmp_path, "ef" * 32, resume=False)
    store.save(0, {"local": np.arange(4), **_results(0)})
    fresh = ChunkStore.for_stage(tmp_path, "ef" * 32, resume=False)
    assert not fresh.path(0).exists()
    fresh.save(1, {"local": np.arange(4), **_results(1)})
    fresh.remove()
    assert not fresh.folder.exists()
    fresh.remove()  # nothing left: no error


def test_array_digest_sees_dtype_shape_and_values():
    a = np.arange(6, dtype=np.int64)
    assert array_digest(a) == array_digest(a.copy())
    assert len({array_digest(a), array_digest(a.astype(np.int32)), array_digest(a.reshape(2, 3)), array_digest(a + 1)}) == 4
