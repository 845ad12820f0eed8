"""Xmipp .xmd ⇄ ParticleTable (Scipion's conventions: same ZYZ angles, shiftX = rlnOriginX in px)."""

import numpy as np
import pytest

from deepalign_cli.errors import DeepAlignError
from deepalign_cli.io import star, xmipp

HANDWRITTEN = """# XMIPP_STAR_1 *
#
data_noname
loop_
 _image
 _enabled
 _angleRot
 _angleTilt
 _anglePsi
 _shiftX
 _shiftY
 _ctfDefocusU
 _ctfDefocusV
 _ctfDefocusAngle
 _itemId
 000001@Runs/stack.mrcs:mrcs 1 10.0 20.0 30.0 1.5 -2.0 15000 14000 12 1
 000002@Runs/stack.mrcs:mrcs -1 11.0 21.0 31.0 0.0 0.0 15000 14000 12 2
 000003@Runs/stack.mrcs:mrcs 1 12.0 22.0 32.0 -3.0 4.0 16000 15500 40 3
"""


def _table():
    n = 3
    ctf = dict(defocus_u_ang=np.array([1e4, 1.1e4, 1.2e4]), defocus_v_ang=np.array([9e3, 1e4, 1.1e4]),
               defocus_angle_deg=np.array([5.0, 15.0, 25.0]), voltage_kv=200.0, cs_mm=2.0, amplitude_contrast=0.08)
    eulers = np.array([[10.0, 20.0, 30.0], [-100.0, 90.0, 170.0], [45.0, 135.0, -60.0]])
    origins = np.array([[10.0, -5.0], [0.0, 2.0], [-4.0, 3.0]])
    return star.make_table([f"{i:06d}@s.mrcs" for i in range(1, n + 1)], eulers, origins, 2.0, 32, ctf)


def test_round_trip_keeps_poses_ctf_and_pixel(tmp_path):
    table = _table()
    xmipp.write_xmd(tmp_path / "p.xmd", table)
    back = xmipp.read_xmd(tmp_path / "p.xmd")
    for got, want in zip(star.get_poses(back), star.get_poses(table)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    for key, value in star.get_ctf_params(table).items():
        np.testing.assert_allclose(star.get_ctf_params(back)[key], value, atol=1e-5)
    assert star.pixel_size(back) == 2.0
    assert star.image_names(back) == star.image_names(table)


def test_shift_is_origin_in_pixels_with_the_same_sign(tmp_path):
    xmipp.write_xmd(tmp_path / "p.xmd", _table())
    text = (tmp_path / "p.xmd").read_text()
    assert text.startswith("# XMIPP_STAR_1 *") and "data_noname" in text
    labels = [line.strip()[1:] for line in text.splitlines() if line.startswith(" _")]
    first_row = [line for line in text.splitlines() if line.startswith(" 000001@")][0].split()
    row = dict(zip(labels, first_row))
    assert float(row["shiftX"]) == pytest.approx(5.0)  # rlnOriginXAngst 10 Å / 2 Å
    assert float(row["shiftY"]) == pytest.approx(-2.5)
    assert float(row["angleRot"]) == pytest.approx(10.0) and row["enabled"] == "1"


def test_handwritten_xmd_drops_disabled_rows_and_format_suffix(tmp_path):
    (tmp_path / "h.xmd").write_text(HANDWRITTEN)
    table = xmipp.read_xmd(tmp_path / "h.xmd")
    assert star.image_names(table) == ["000001@Runs/stack.mrcs", "000003@Runs/stack.mrcs"]
    with pytest.raises(DeepAlignError, match="pass --angpix"):
        star.get_poses(table)  # shifts are in pixels and the pixel size is unknown
    table = xmipp.read_xmd(tmp_path / "h.xmd", pixel_size_ang=2.0)
    eulers, origins = star.get_poses(table)
    np.testing.assert_allclose(eulers, [[10, 20, 30], [12, 22, 32]])
    np.testing.assert_allclose(origins, [[3.0, -4.0], [-6.0, 8.0]])
    assert table.particles["itemId"].tolist() == [1, 3]
    xmipp.write_xmd(tmp_path / "again.xmd", table)
    assert xmipp.read_xmd(tmp_path / "again.xmd").particles["itemId"].tolist() == [1, 3]


def test_xmd_without_image_label_is_error(tmp_path):
    (tmp_path / "bad.xmd").write_text("data_noname\nloop_\n _angleRot\n 1.0\n")
    with pytest.raises(DeepAlignError, match="bad.xmd: no _image label"):
        xmipp.read_xmd(tmp_path / "bad.xmd")
