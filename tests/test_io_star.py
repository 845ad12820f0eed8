"""RELION STAR reading (3.0 and 3.1), poses/CTF accessors and RELION-compatible writing."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deepalign_cli.errors import DeepAlignError
from deepalign_cli.io import mrc, star

ORACLE = Path("/work/shared/data/relion_project_oracle")
ORACLE_SHIFTS = [(6, 10), (10, -5), (-8, 11), (-13, -3)]
RELION_RECONSTRUCT = shutil.which("relion_reconstruct") or ("/usr/bin/relion_reconstruct" if Path("/usr/bin/relion_reconstruct").exists() else None)

RELION30 = """
data_

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginX #5
_rlnOriginY #6
_rlnDefocusU #7
_rlnDefocusV #8
_rlnDefocusAngle #9
_rlnVoltage #10
_rlnSphericalAberration #11
_rlnAmplitudeContrast #12
_rlnDetectorPixelSize #13
_rlnMagnification #14
_rlnMyScore #15
1@s.mrcs 10.0 20.0 30.0 2.0 -1.0 15000 14000 45 300 2.7 0.1 5.0 10000 0.5
2@s.mrcs 40.0 50.0 60.0 -3.0 4.0 16000 15000 10 300 2.7 0.1 5.0 10000 0.25
"""


def _relion30(tmp_path, text=RELION30):
    path = tmp_path / "old.star"
    path.write_text(text)
    return path


def test_oracle_pixel_origins_become_angstrom_with_optics_pixel():
    table = star.read_particles(ORACLE / "rln_proj_64_shifted.star")
    eulers, origins = star.get_poses(table)
    np.testing.assert_allclose(origins, np.array(ORACLE_SHIFTS, float))  # pixel size 1 Å
    np.testing.assert_allclose(eulers[0], [235.820138, 113.086030, 50.468981])
    assert "rlnOriginX" not in table.particles
    np.testing.assert_allclose(star.pixel_sizes(table), 1.0)
    assert star.box_size(table) == 64
    assert star.image_names(table)[0] == "000001@rln_proj_64_shifted.mrcs"


def test_oracle_with_both_origin_columns_keeps_the_angstrom_ones():
    table = star.read_particles(ORACLE / "rln_proj_65_centered.star")
    assert "rlnOriginX" not in table.particles and "rlnOriginXAngst" in table.particles
    np.testing.assert_allclose(star.get_poses(table)[1], 0.0)


def test_oracle_without_optics_has_unknown_pixel_size():
    table = star.read_particles(ORACLE / "rln_proj_64.star")
    assert table.optics is None and len(table) == 5
    with pytest.raises(DeepAlignError, match=r"rln_proj_64.star: no pixel size .*pass --angpix"):
        star.pixel_sizes(table)
    eulers, origins = star.get_poses(table)  # origins are already in Å (zeros)
    np.testing.assert_allclose(eulers[4], [250.742147, 120.229633, 124.614004])
    fixed = star.with_pixel_size(table, 5.0)
    np.testing.assert_allclose(star.pixel_sizes(fixed), 5.0)


def test_relion30_pixel_origins_converted_with_detector_pixel(tmp_path):
    table = star.read_particles(_relion30(tmp_path))
    np.testing.assert_allclose(star.pixel_sizes(table), 5.0)  # 5 µm × 10⁴ / 10000
    _, origins = star.get_poses(table)
    np.testing.assert_allclose(origins, [[10.0, -5.0], [-15.0, 20.0]])
    assert len(table.optics) == 1
    assert table.optics["rlnVoltage"].iloc[0] == 300
    assert "rlnVoltage" not in table.particles and "rlnMagnification" not in table.particles
    np.testing.assert_allclose(table.particles["rlnMyScore"], [0.5, 0.25])


def test_relion30_two_pixel_sizes_make_two_optics_groups(tmp_path):
    text = RELION30.replace("5.0 10000 0.25", "7.0 10000 0.25")
    table = star.read_particles(_relion30(tmp_path, text))
    assert len(table.optics) == 2
    np.testing.assert_allclose(star.pixel_sizes(table), [5.0, 7.0])
    np.testing.assert_allclose(star.get_poses(table)[1], [[10.0, -5.0], [-21.0, 28.0]])
    with pytest.raises(DeepAlignError, match="different pixel sizes"):
        star.pixel_size(table)


def test_relion30_without_pixel_needs_angpix_for_pixel_origins(tmp_path):
    text = RELION30.replace("_rlnDetectorPixelSize #13\n_rlnMagnification #14\n", "").replace(" 5.0 10000", "")
    table = star.read_particles(_relion30(tmp_path, text))
    with pytest.raises(DeepAlignError, match=r"origins are in pixels .*pass --angpix"):
        star.get_poses(table)
    fixed = star.with_pixel_size(table, 2.0)
    np.testing.assert_allclose(star.get_poses(fixed)[1], [[4.0, -2.0], [-6.0, 8.0]])
    assert fixed.optics["rlnVoltage"].iloc[0] == 300


def test_unknown_columns_survive_read_write_read(tmp_path):
    table = star.read_particles(_relion30(tmp_path))
    table.particles["rlnDeepAlignRegion"] = [3, 7]
    star.write_particles(tmp_path / "new.star", table, box=16)
    back = star.read_particles(tmp_path / "new.star")
    np.testing.assert_allclose(back.particles["rlnMyScore"], [0.5, 0.25])
    assert back.particles["rlnDeepAlignRegion"].tolist() == [3, 7]
    np.testing.assert_allclose(star.get_poses(back)[1], star.get_poses(table)[1])
    text = (tmp_path / "new.star").read_text()
    assert text.index("data_optics") < text.index("data_particles")
    assert text.count("# version 30001") == 2


def test_set_poses_returns_a_new_table(tmp_path):
    table = star.read_particles(ORACLE / "rln_proj_64_shifted.star")
    new = star.set_poses(table, np.zeros((4, 3)), np.ones((4, 2)))
    np.testing.assert_allclose(star.get_poses(new)[0], 0.0)
    np.testing.assert_allclose(star.get_poses(new)[1], 1.0)
    np.testing.assert_allclose(star.get_poses(table)[1], ORACLE_SHIFTS)  # original untouched


def test_missing_angles_is_one_line_error_naming_the_file(tmp_path):
    table = star.make_table(["1@a.mrcs"], None, None, 1.0, 16)
    table.source = Path("subset.star")
    with pytest.raises(DeepAlignError, match=r"^subset.star: no rlnAngleRot column; label needs a pre-aligned subset$"):
        star.get_poses(table, hint="label needs a pre-aligned subset")


def test_ctf_params_come_from_particles_and_optics(tmp_path):
    ctf = star.get_ctf_params(star.read_particles(_relion30(tmp_path)))
    np.testing.assert_allclose(ctf["defocus_u_ang"], [15000, 16000])
    np.testing.assert_allclose(ctf["defocus_angle_deg"], [45, 10])
    np.testing.assert_allclose(ctf["voltage_kv"], [300, 300])
    np.testing.assert_allclose(ctf["cs_mm"], 2.7)
    np.testing.assert_allclose(ctf["amplitude_contrast"], 0.1)
    assert star.get_ctf_params(star.read_particles(ORACLE / "rln_proj_64_centered.star")) is None


def test_make_table_builds_one_relion31_optics_group():
    n = 3
    ctf = dict(defocus_u_ang=np.full(n, 1e4), defocus_v_ang=np.full(n, 9e3), defocus_angle_deg=np.zeros(n),
               voltage_kv=200.0, cs_mm=np.full(n, 2.0), amplitude_contrast=0.07)
    table = star.make_table([f"{i}@p.mrcs" for i in (1, 2, 3)], np.ones((n, 3)), np.zeros((n, 2)), 1.5, 32, ctf,
                            {"rlnDeepAlignRegion": [0, 1, 2]})
    optics = table.optics.iloc[0]
    assert optics["rlnImageSize"] == 32 and optics["rlnImageDimensionality"] == 2
    assert optics["rlnImagePixelSize"] == 1.5 and optics["rlnVoltage"] == 200.0
    assert optics["rlnSphericalAberration"] == 2.0 and optics["rlnAmplitudeContrast"] == 0.07
    assert optics["rlnOpticsGroupName"] == "opticsGroup1"
    assert star.get_ctf_params(table)["voltage_kv"].tolist() == [200.0] * 3


def test_write_without_optics_synthesises_a_group(tmp_path):
    table = star.read_particles(ORACLE / "rln_proj_64.star")
    with pytest.raises(DeepAlignError, match="pass --angpix"):
        star.write_particles(tmp_path / "x.star", table)
    star.write_particles(tmp_path / "x.star", table, pixel_size_ang=5.0)
    back = star.read_particles(tmp_path / "x.star")
    assert star.pixel_size(back) == 5.0
    assert star.box_size(back) == 64  # read from the stack header next to the source STAR
    assert back.optics["rlnVoltage"].iloc[0] == star.DEFAULT_VOLTAGE_KV


def test_missing_and_garbage_star_files_are_errors(tmp_path):
    with pytest.raises(DeepAlignError, match="nope.star: file not found"):
        star.read_particles(tmp_path / "nope.star")
    (tmp_path / "empty.star").write_text("# nothing here\n")
    with pytest.raises(DeepAlignError, match="empty.star"):
        star.read_particles(tmp_path / "empty.star")


@pytest.mark.skipif(RELION_RECONSTRUCT is None, reason="relion_reconstruct not installed")
def test_relion_reconstruct_accepts_written_star(tmp_path):
    n, box = 50, 16
    rng = np.random.default_rng(0)
    mrc.write_stack(tmp_path / "parts.mrcs", rng.normal(size=(n, box, box)).astype(np.float32), 2.0)
    eulers = np.stack([rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], axis=1)
    ctf = dict(defocus_u_ang=rng.uniform(1e4, 2e4, n), defocus_v_ang=rng.uniform(1e4, 2e4, n),
               defocus_angle_deg=rng.uniform(0, 180, n), voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    table = star.make_table([f"{i + 1:06d}@parts.mrcs" for i in range(n)], eulers, rng.normal(size=(n, 2)), 2.0, box,
                            ctf, {"rlnDeepAlignRegion": np.arange(n) % 5})
    star.write_particles(tmp_path / "parts.star", table)
    run = subprocess.run([RELION_RECONSTRUCT, "--i", "parts.star", "--o", "out.mrc", "--ctf"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "ERROR" not in run.stdout + run.stderr
    vol, voxel = mrc.read_map(tmp_path / "out.mrc")
    assert vol.shape == (box, box, box) and voxel == pytest.approx(2.0)
    assert np.all(np.isfinite(vol)) and vol.std() > 0


def test_read_any_picks_the_reader_by_suffix_and_applies_angpix(tmp_path):
    from deepalign_cli.io.particles import read_any

    table = read_any(ORACLE / "rln_proj_64.star", angpix=5.0)
    assert star.pixel_size(table) == 5.0 and len(table) == 5
    assert table.get_poses()[0].shape == (5, 3)  # method form of get_poses
    with pytest.raises(DeepAlignError, match=r"x.mrc: unknown particle file type '.mrc'"):
        read_any(tmp_path / "x.mrc")
