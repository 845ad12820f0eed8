"""The CTF follows RELION's formula and sign (analytic checks + live relion_project --ctf)."""

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from deepalign_cli.core import ctf, preprocess, projector
from deepalign_cli.core.geometry import euler_to_matrix

MAP65 = Path(__file__).resolve().parents[1] / "deepalign_cli" / "data" / "ribosome70S_65.mrc"
OPTICS = dict(voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)


def ncc(a, b):
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_wavelength_at_300kv_is_relativistic_value():
    assert float(ctf.electron_wavelength_ang(300.0)) == pytest.approx(0.019687, abs=2e-6)


def test_freq_grid_is_unshifted_fft_layout_in_inverse_angstrom():
    sy, sx = ctf.freq_grid(8, 2.0)
    assert float(sx[0, 0]) == 0.0 and float(sx[0, 1]) == pytest.approx(1 / 16)
    assert float(sy[1, 0]) == pytest.approx(1 / 16) and float(sy[4, 0]) == pytest.approx(-0.25)


def test_ctf_at_dc_equals_amplitude_contrast_and_is_positive_at_low_frequency():
    du, dv = np.array([15000.0, 20000.0]), np.array([14000.0, 20000.0])
    c = np.asarray(ctf.ctf_2d(64, 1.5, du, dv, np.zeros(2), **OPTICS))
    assert c.shape == (2, 64, 64) and c.dtype == np.float32
    np.testing.assert_allclose(c[:, 0, 0], 0.1, rtol=1e-5)
    assert np.all(c[:, 0, 1] > 0.1)  # underfocus: contrast grows before the first zero


def test_phase_shift_of_90_degrees_turns_dc_into_phase_contrast():
    """χ(0) = -φ - asin(Q0), so CTF(0) = sin(90° + asin(Q0)) = sqrt(1 - Q0²)."""
    c = np.asarray(ctf.ctf_2d(32, 1.0, 10000.0, 10000.0, 0.0, phase_shift_deg=90.0, **OPTICS))
    assert c[0, 0, 0] == pytest.approx(np.sqrt(1 - 0.1**2), abs=1e-6)


def test_astigmatism_angle_of_90_degrees_transposes_the_pattern():
    kwargs = dict(box=48, pixel_size_ang=1.2, defocus_u_ang=20000.0, defocus_v_ang=12000.0, **OPTICS)
    c0 = np.asarray(ctf.ctf_2d(defocus_angle_deg=0.0, **kwargs))[0]
    c90 = np.asarray(ctf.ctf_2d(defocus_angle_deg=90.0, **kwargs))[0]
    assert not np.allclose(c0, c90, atol=1e-2)
    np.testing.assert_allclose(c90, c0.T, atol=3e-4)  # float32 χ at high frequency


def test_defocus_u_acts_along_the_astigmatism_angle():
    """With angle 0, U (the larger defocus) is along x, so the first zero comes sooner along x."""
    c = np.asarray(ctf.ctf_2d(128, 1.0, 25000.0, 10000.0, 0.0, **OPTICS))[0]
    first_zero_x = np.argmax(c[0, :64] < 0)
    first_zero_y = np.argmax(c[:64, 0] < 0)
    assert first_zero_x < first_zero_y


def test_bfactor_is_a_gaussian_envelope():
    kwargs = dict(box=32, pixel_size_ang=2.0, defocus_u_ang=15000.0, defocus_v_ang=15000.0, defocus_angle_deg=0.0)
    plain = np.asarray(ctf.ctf_2d(**kwargs, **OPTICS))[0]
    damped = np.asarray(ctf.ctf_2d(**kwargs, **OPTICS, bfactor_ang2=100.0))[0]
    sy, sx = (np.asarray(g) for g in ctf.freq_grid(32, 2.0))
    np.testing.assert_allclose(damped, plain * np.exp(-100.0 / 4 * (sx**2 + sy**2)), atol=1e-6)


@pytest.mark.skipif(shutil.which("relion_project") is None, reason="relion_project not installed")
def test_ctf_modulated_projections_match_relion_project_ctf(tmp_path):
    vol = np.asarray(preprocess.fourier_crop_volume(mrcfile.read(MAP65)[:64, :64, :64], 48))
    pixel_ang, n = 2.0, 6
    rng = np.random.default_rng(3)
    eulers = np.stack(
        [rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)], axis=1
    )
    origins = rng.uniform(-4, 4, (n, 2)).round(2)
    du = rng.uniform(12000, 25000, n)
    dv = du - rng.uniform(4000, 8000, n)
    angle = rng.uniform(20, 70, n)  # away from 0/90 so a mirrored angle gives a different pattern
    with mrcfile.new(tmp_path / "map.mrc") as m:
        m.set_data(vol.astype(np.float32))
        m.voxel_size = pixel_ang
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [OPTICS["voltage_kv"]],
            "rlnSphericalAberration": [OPTICS["cs_mm"]],
            "rlnAmplitudeContrast": [OPTICS["amplitude_contrast"]],
            "rlnImagePixelSize": [pixel_ang],
            "rlnImageSize": [48],
            "rlnImageDimensionality": [2],
        }
    )
    parts = pd.DataFrame(
        {
            "rlnAngleRot": eulers[:, 0],
            "rlnAngleTilt": eulers[:, 1],
            "rlnAnglePsi": eulers[:, 2],
            "rlnOriginXAngst": origins[:, 0] * pixel_ang,
            "rlnOriginYAngst": origins[:, 1] * pixel_ang,
            "rlnDefocusU": du,
            "rlnDefocusV": dv,
            "rlnDefocusAngle": angle,
            "rlnOpticsGroup": [1] * n,
            "rlnImageName": [f"{i + 1:06d}@dummy.mrcs" for i in range(n)],
        }
    )
    starfile.write({"optics": optics, "particles": parts}, tmp_path / "poses.star")
    cmd = ["relion_project", "--i", "map.mrc", "--o", "proj", "--ang", "poses.star", "--angpix", str(pixel_ang)]
    cmd.append("--ctf")
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    relion = mrcfile.read(tmp_path / "proj.mrcs")

    rot = euler_to_matrix(eulers[:, 0], eulers[:, 1], eulers[:, 2])
    proj_ft = np.asarray(projector.project_ft(projector.prepare_volume(vol), rot, origins))

    def modulated(angles_deg, sign=1.0):
        c = np.asarray(ctf.ctf_2d(48, pixel_ang, du, dv, angles_deg, **OPTICS))
        return np.real(np.fft.ifft2(proj_ft * sign * c))

    scores = [ncc(a, b) for a, b in zip(modulated(angle), relion)]
    assert min(scores) >= 0.99, scores
    assert max(ncc(a, b) for a, b in zip(modulated(angle, sign=-1.0), relion)) < 0  # opposite sign
    assert min(ncc(a, b) for a, b in zip(modulated(-angle), relion)) < 0.99  # mirrored astigmatism
