"""cryoSPARC .cs → ParticleTable, with pyem's csparc2star conventions."""

from pathlib import Path

import numpy as np
import pytest

from deepalign_cli.core.geometry import eulers_to_matrices, matrix_to_rotvec, rotation_distance_deg
from deepalign_cli.errors import DeepAlignError
from deepalign_cli.io import cryosparc, star


def _write_cs(path: Path, fields: dict) -> Path:
    """np.save a record array the way cryoSPARC does (file handle: no '.npy' appended)."""
    n = len(next(iter(fields.values())))
    dtype = [(k, np.asarray(v).dtype, np.asarray(v).shape[1:]) for k, v in fields.items()]
    arr = np.zeros(n, dtype=dtype)
    for k, v in fields.items():
        arr[k] = v
    with open(path, "wb") as f:
        np.save(f, arr)
    return path


def _fields(n=4, pose=None, shift=None, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "uid": np.arange(1000, 1000 + n, dtype=np.uint64),
        "blob/path": np.array([b">J3/imported/parts.mrcs"] * n, dtype="S64"),
        "blob/idx": np.arange(n, dtype=np.uint32),
        "blob/shape": np.tile(np.array([64, 64], np.uint32), (n, 1)),
        "blob/psize_A": np.full(n, 1.5, np.float32),
        "alignments3D/pose": rng.normal(size=(n, 3)).astype(np.float32) if pose is None else np.asarray(pose, np.float32),
        "alignments3D/shift": rng.normal(size=(n, 2)).astype(np.float32) if shift is None else np.asarray(shift, np.float32),
        "alignments3D/psize_A": np.full(n, 1.5, np.float32),
        "ctf/df1_A": np.full(n, 15000, np.float32),
        "ctf/df2_A": np.full(n, 14000, np.float32),
        "ctf/df_angle_rad": np.full(n, np.pi / 4, np.float32),
        "ctf/accel_kv": np.full(n, 300, np.float32),
        "ctf/cs_mm": np.full(n, 2.7, np.float32),
        "ctf/amp_contrast": np.full(n, 0.07, np.float32),
    }


def test_pose_about_z_becomes_psi(tmp_path):
    # cryoSPARC R = Rz(θ); RELION A = Rᵀ = Rz(-θ) = Euler_angles2matrix(0, 0, θ)
    theta = 0.5
    table = cryosparc.read_cs(_write_cs(tmp_path / "p.cs", _fields(1, pose=[[0, 0, theta]], shift=[[0, 0]])))
    eulers, _ = star.get_poses(table)
    np.testing.assert_allclose(eulers[0], [0.0, 0.0, np.rad2deg(theta)], atol=1e-4)


def test_pose_about_y_becomes_tilt(tmp_path):
    # cryoSPARC R = Ry(θ); A = Ry(-θ) = Euler_angles2matrix(0, θ, 0)
    theta = 0.3
    table = cryosparc.read_cs(_write_cs(tmp_path / "p.cs", _fields(1, pose=[[0, theta, 0]], shift=[[0, 0]])))
    np.testing.assert_allclose(star.get_poses(table)[0][0], [0.0, np.rad2deg(theta), 0.0], atol=1e-4)


def test_poses_round_trip_to_chosen_relion_eulers(tmp_path):
    rng = np.random.default_rng(1)
    n = 20
    chosen = np.stack([rng.uniform(-180, 180, n), rng.uniform(5, 175, n), rng.uniform(-180, 180, n)], axis=1)
    pose = matrix_to_rotvec(np.swapaxes(eulers_to_matrices(chosen), -1, -2))  # cryoSPARC stores Aᵀ
    table = cryosparc.read_cs(_write_cs(tmp_path / "p.cs", _fields(n, pose=pose, shift=np.zeros((n, 2)))))
    eulers, _ = star.get_poses(table)
    assert np.max(rotation_distance_deg(eulers_to_matrices(eulers), eulers_to_matrices(chosen))) < 1e-3
    np.testing.assert_allclose(eulers, chosen, atol=1e-3)


def test_shifts_in_pixels_become_angstrom_with_same_sign(tmp_path):
    shift = [[2.0, -1.0], [0.5, 3.0]]
    table = cryosparc.read_cs(_write_cs(tmp_path / "p.cs", _fields(2, shift=shift)))
    np.testing.assert_allclose(star.get_poses(table)[1], np.array(shift) * 1.5, rtol=1e-6)


def test_ctf_and_optics_are_converted(tmp_path):
    table = cryosparc.read_cs(_write_cs(tmp_path / "p.cs", _fields(3)))
    ctf = star.get_ctf_params(table)
    np.testing.assert_allclose(ctf["defocus_u_ang"], 15000)
    np.testing.assert_allclose(ctf["defocus_v_ang"], 14000)
    np.testing.assert_allclose(ctf["defocus_angle_deg"], 45.0, rtol=1e-5)
    np.testing.assert_allclose(ctf["amplitude_contrast"], 0.07, rtol=1e-5)
    assert len(table.optics) == 1
    assert star.pixel_size(table) == pytest.approx(1.5) and star.box_size(table) == 64


def test_image_names_are_one_based_without_import_marker(tmp_path):
    table = cryosparc.read_cs(_write_cs(tmp_path / "p.cs", _fields(3)))
    assert star.image_names(table) == [f"00000{i}@J3/imported/parts.mrcs" for i in (1, 2, 3)]
    assert table.particles[cryosparc.UID_COLUMN].tolist() == ["1000", "1001", "1002"]


def test_passthrough_supplies_missing_fields_by_uid(tmp_path):
    full = _fields(4)
    poses = {k: full[k][::-1] for k in ("uid", "alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A")}
    passthrough = {k: v for k, v in full.items() if not k.startswith("alignments3D")}
    main = _write_cs(tmp_path / "refine.cs", poses)
    pt = _write_cs(tmp_path / "passthrough.cs", passthrough)
    with pytest.raises(DeepAlignError, match="no blob/path field; pass the passthrough"):
        cryosparc.read_cs(main)
    table = cryosparc.read_cs(main, passthrough=pt)
    reference = cryosparc.read_cs(_write_cs(tmp_path / "all.cs", full))
    assert star.image_names(table) == star.image_names(reference)[::-1]
    np.testing.assert_allclose(star.get_poses(table)[0], star.get_poses(reference)[0][::-1], atol=1e-9)


def test_table_from_cs_writes_a_relion_star(tmp_path):
    table = cryosparc.read_cs(_write_cs(tmp_path / "p.cs", _fields(3)))
    star.write_particles(tmp_path / "p.star", table)
    back = star.read_particles(tmp_path / "p.star")
    np.testing.assert_allclose(star.get_poses(back)[0], star.get_poses(table)[0], atol=1e-5)
    assert star.pixel_size(back) == pytest.approx(1.5)


def test_not_a_cs_file_is_one_line_error(tmp_path):
    (tmp_path / "x.cs").write_text("not numpy")
    with pytest.raises(DeepAlignError, match="x.cs: not a cryoSPARC .cs file"):
        cryosparc.read_cs(tmp_path / "x.cs")
