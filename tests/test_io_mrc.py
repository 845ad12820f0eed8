"""MRC maps, stacks, the streaming writer and the chunked image reader."""

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from deepalign_cli.errors import DeepAlignError
from deepalign_cli.io import mrc

ORACLE = Path("/work/shared/data/relion_project_oracle")
RIBOSOME = Path(__file__).resolve().parents[1] / "deepalign_cli" / "data" / "ribosome70S_65.mrc"


def _noise(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_map_round_trip_keeps_data_and_voxel_size(tmp_path):
    vol = _noise((8, 8, 8))
    mrc.write_map(tmp_path / "m.mrc", vol, 2.5)
    back, voxel = mrc.read_map(tmp_path / "m.mrc")
    assert back.dtype == np.float32 and back.shape == (8, 8, 8)
    np.testing.assert_array_equal(back, vol)
    assert voxel == pytest.approx(2.5)
    with mrcfile.open(tmp_path / "m.mrc") as m:  # strict mode: a valid header
        assert m.is_volume()
    assert [p.name for p in tmp_path.iterdir()] == ["m.mrc"]  # no temporary left behind


def test_shipped_ribosome_map_has_no_voxel_size():
    vol, voxel = mrc.read_map(RIBOSOME)
    assert vol.shape == (65, 65, 65) and vol.dtype == np.float32
    assert voxel is None
    assert vol.max() == pytest.approx(7.3879e-4, rel=1e-3)


def test_map_with_permuted_axes_is_returned_z_y_x(tmp_path):
    vol = _noise((6, 6, 6))
    with mrcfile.new(tmp_path / "p.mrc") as m:  # store as [x, y, z] (mapc=3, mapr=2, maps=1)
        m.set_data(np.ascontiguousarray(vol.transpose(2, 1, 0)))
        m.header.mapc, m.header.mapr, m.header.maps = 3, 2, 1
    back, _ = mrc.read_map(tmp_path / "p.mrc")
    np.testing.assert_array_equal(back, vol)


def test_missing_map_is_one_line_error(tmp_path):
    with pytest.raises(DeepAlignError, match="nope.mrc: file not found"):
        mrc.read_map(tmp_path / "nope.mrc")


def test_garbage_file_is_error(tmp_path):
    (tmp_path / "junk.mrc").write_bytes(b"hello" * 10)
    with pytest.raises(DeepAlignError, match="junk.mrc"):
        mrc.read_map(tmp_path / "junk.mrc")


def test_truncated_map_is_error(tmp_path):
    mrc.write_map(tmp_path / "t.mrc", _noise((8, 8, 8)), 1.0)
    data = (tmp_path / "t.mrc").read_bytes()
    (tmp_path / "t.mrc").write_bytes(data[:-100])
    with pytest.raises(DeepAlignError, match="t.mrc: truncated"):
        mrc.read_map(tmp_path / "t.mrc")


def test_non_cubic_map_is_error(tmp_path):
    with mrcfile.new(tmp_path / "box.mrc") as m:
        m.set_data(_noise((4, 6, 6)))
    with pytest.raises(DeepAlignError, match="expected a cube"):
        mrc.read_map(tmp_path / "box.mrc")


def test_oracle_mrcs_marked_as_volume_opens_as_stack():
    stack = mrc.open_stack(ORACLE / "rln_proj_64.mrcs")  # header: ispg=1, mz=5 ("volume")
    assert stack.shape == (5, 64, 64)
    with mrcfile.open(ORACLE / "rln_proj_64.mrcs") as m:
        np.testing.assert_array_equal(stack, m.data)


def test_open_stack_is_read_only_memmap(tmp_path):
    mrc.write_stack(tmp_path / "s.mrcs", _noise((3, 8, 8)), 1.5)
    stack = mrc.open_stack(tmp_path / "s.mrcs")
    assert isinstance(stack, np.memmap) and stack.shape == (3, 8, 8)
    with pytest.raises(ValueError):
        stack[0, 0, 0] = 1.0
    assert mrc.stack_info(tmp_path / "s.mrcs") == (3, 8, pytest.approx(1.5))


def test_truncated_stack_is_error(tmp_path):
    mrc.write_stack(tmp_path / "s.mrcs", _noise((3, 8, 8)), 1.0)
    data = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "s.mrcs").write_bytes(data[: len(data) - 8 * 8 * 4])
    with pytest.raises(DeepAlignError, match="s.mrcs: truncated"):
        mrc.open_stack(tmp_path / "s.mrcs")


def test_stack_writer_streams_chunks_and_renames_on_close(tmp_path):
    images = _noise((10, 8, 8))
    out = tmp_path / "big.mrcs"
    with mrc.StackWriter(out, 10, 8, 2.0) as w:
        w.write(6, images[6:])
        w.write(0, images[:3])
        w.write(3, images[3:6])
        assert not out.exists()  # still under a temporary name
    with mrcfile.open(out) as m:
        np.testing.assert_array_equal(m.data, images)
        assert m.is_image_stack()
        assert float(m.voxel_size.x) == pytest.approx(2.0)
        assert float(m.header.dmean) == pytest.approx(images.mean(), abs=1e-5)
        assert float(m.header.rms) == pytest.approx(images.std(), rel=1e-4)
        assert float(m.header.dmax) == pytest.approx(images.max())


def test_stack_writer_exception_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with mrc.StackWriter(tmp_path / "x.mrcs", 4, 8, 1.0) as w:
            w.append(_noise((2, 8, 8)))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_stack_writer_with_missing_images_is_error_and_no_file(tmp_path):
    with pytest.raises(DeepAlignError, match="only 2 of 4 images"):
        with mrc.StackWriter(tmp_path / "x.mrcs", 4, 8, 1.0) as w:
            w.append(_noise((2, 8, 8)))
    assert list(tmp_path.iterdir()) == []


def _two_stacks(tmp_path):
    a, b = _noise((12, 8, 8), 1), _noise((5, 8, 8), 2)
    mrc.write_stack(tmp_path / "a.mrcs", a, 1.0)
    (tmp_path / "sub").mkdir()
    mrc.write_stack(tmp_path / "sub" / "b.mrcs", b, 1.0)
    return a, b


def test_image_reader_reads_across_stacks_in_table_order(tmp_path):
    a, b = _two_stacks(tmp_path)
    names = ["3@a.mrcs", "000001@sub/b.mrcs", "12@a.mrcs", "5@sub/b.mrcs", "1@a.mrcs"]
    reader = mrc.ImageReader(names, tmp_path)
    assert len(reader) == 5 and reader.box == 8
    got = reader.read([0, 1, 2, 3, 4])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.stack([a[2], b[0], a[11], b[4], a[0]]))
    np.testing.assert_array_equal(reader.read([4, 0]), np.stack([a[0], a[2]]))


def test_iter_chunks_covers_every_row_once(tmp_path):
    a, _ = _two_stacks(tmp_path)
    reader = mrc.ImageReader([f"{i}@a.mrcs" for i in range(1, 13)], tmp_path)
    chunks = list(reader.iter_chunks(5))
    assert [c[0] for c in chunks] == [slice(0, 5), slice(5, 10), slice(10, 12)]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), a)


def test_image_reader_index_beyond_stack_is_error(tmp_path):
    _two_stacks(tmp_path)
    with pytest.raises(DeepAlignError, match=r"^a.mrcs: image 13 requested but the stack has 12$"):
        mrc.ImageReader(["1@a.mrcs", "13@a.mrcs"], tmp_path)


def test_image_reader_missing_stack_is_error(tmp_path):
    with pytest.raises(DeepAlignError, match="gone.mrcs: stack not found"):
        mrc.ImageReader(["1@gone.mrcs"], tmp_path)


def test_image_reader_mixed_box_sizes_is_error(tmp_path):
    _two_stacks(tmp_path)
    mrc.write_stack(tmp_path / "c.mrcs", _noise((2, 10, 10)), 1.0)
    with pytest.raises(DeepAlignError, match="box 10 differs from box 8"):
        mrc.ImageReader(["1@a.mrcs", "1@c.mrcs"], tmp_path)


def test_image_reader_keeps_only_a_few_stacks_open(tmp_path):
    for k in range(5):
        mrc.write_stack(tmp_path / f"s{k}.mrcs", np.full((2, 4, 4), k, np.float32), 1.0)
    reader = mrc.ImageReader([f"2@s{k}.mrcs" for k in range(5)], tmp_path, max_open=2)
    assert reader.read(range(5))[:, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert len(reader._open) <= 2


def test_chunk_size_for_budget_scales_with_box():
    assert mrc.chunk_size_for_budget(64, 64 * 64 * 4 * 10, bytes_per_image_factor=1.0) == 10
    assert mrc.chunk_size_for_budget(128, 64 * 64 * 4 * 10, bytes_per_image_factor=1.0) == 2
    assert mrc.chunk_size_for_budget(512, 10) == 1
