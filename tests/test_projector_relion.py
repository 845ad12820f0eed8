"""The Fourier-slice projector reproduces RELION's projections (oracle files and live relion_project)."""

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from deepalign_cli.core import preprocess, projector
from deepalign_cli.core.geometry import euler_to_matrix

MAP65 = Path(__file__).resolve().parents[1] / "deepalign_cli" / "data" / "ribosome70S_65.mrc"
ORACLE_CANDIDATES = [
    Path(__file__).resolve().parent / "data" / "relion_project_oracle",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "relion_project_oracle",
]
ORACLE = next((p for p in ORACLE_CANDIDATES if p.exists()), ORACLE_CANDIDATES[0])
needs_oracle = pytest.mark.skipif(not ORACLE.exists(), reason=f"RELION oracle files not found at {ORACLE}")
NCC_MIN = 0.99


def ncc(a, b):
    """Normalised cross-correlation of two images (z-scored dot product)."""
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def map65():
    return mrcfile.read(MAP65).astype(np.float64)


@pytest.fixture(scope="module")
def map64(map65):
    """ASPIRE's Volume.downsample(64) of the 65³ map (recipe in shared/data/README.md)."""
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(map65)))[:64, :64, :64]
    f[0], f[:, 0], f[:, :, 0] = 0, 0, 0
    return (np.real(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f)))) * 64**3 / 65**3).astype(np.float32)


def read_oracle(box, kind):
    """(images (n, L, L), A (n, 3, 3), origins_px (n, 2)) of one oracle STAR/MRCS pair."""
    parts = starfile.read(ORACLE / f"rln_proj_{box}_{kind}.star")["particles"]
    images = mrcfile.read(ORACLE / f"rln_proj_{box}_{kind}.mrcs")
    rot = euler_to_matrix(parts.rlnAngleRot.values, parts.rlnAngleTilt.values, parts.rlnAnglePsi.values)
    if "rlnOriginX" in parts:
        origins = parts[["rlnOriginX", "rlnOriginY"]].to_numpy(float)
    else:  # pixel size 1.0 in the optics table
        origins = parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    return images, rot, origins


@needs_oracle
@pytest.mark.parametrize("kind", ["centered", "shifted"])
def test_projector_reproduces_every_relion_64_oracle_image(map64, kind):
    images, rot, origins = read_oracle(64, kind)
    ours = np.asarray(projector.project(projector.prepare_volume(map64), rot, origins))
    scores = [ncc(a, b) for a, b in zip(ours, images)]
    assert min(scores) >= NCC_MIN, scores


@needs_oracle
@pytest.mark.parametrize("kind", ["centered", "shifted"])
def test_projector_reproduces_relion_65_oracle_after_one_pixel_roll(map65, kind):
    """Odd box: RELION's image is ours rolled by (1, 1) (shared/data/README.md)."""
    images, rot, origins = read_oracle(65, kind)
    ours = np.asarray(projector.project(projector.prepare_volume(map65), rot, origins))
    scores = [ncc(np.roll(a, (1, 1), axis=(0, 1)), b) for a, b in zip(ours, images)]
    assert min(scores) >= NCC_MIN, scores


@needs_oracle
def test_wrong_conventions_fail_the_oracle(map64):
    """Using A instead of Aᵀ, or the opposite origin sign, must drop below the threshold."""
    images, rot, origins = read_oracle(64, "shifted")
    vol_ft = projector.prepare_volume(map64)
    transposed = np.asarray(projector.project(vol_ft, np.swapaxes(rot, 1, 2), origins))
    flipped_shift = np.asarray(projector.project(vol_ft, rot, -origins))
    assert max(ncc(a, b) for a, b in zip(transposed, images)) < NCC_MIN
    assert max(ncc(a, b) for a, b in zip(flipped_shift, images)) < NCC_MIN


@needs_oracle
def test_shifting_particle_by_plus_origin_recentres_it():
    shifted, _, origins = read_oracle(64, "shifted")
    centred, _, _ = read_oracle(64, "centered")
    recentred = np.asarray(projector.shift_images(shifted, origins))
    np.testing.assert_allclose(recentred, centred, atol=1e-5 * np.abs(centred).max())


def test_project_is_inverse_fft_of_project_ft_and_shift_ft_matches_real_shift(map64):
    rot = euler_to_matrix(np.array([10.0, 70.0]), np.array([40.0, 100.0]), np.array([-30.0, 5.0]))
    vol_ft = projector.prepare_volume(map64)
    shifts = np.array([[2.5, -1.0], [0.0, 3.0]])
    ft = projector.project_ft(vol_ft, rot, shifts)
    assert ft.shape == (2, 64, 64) and ft.dtype == np.complex64
    np.testing.assert_allclose(projector.project(vol_ft, rot, shifts), np.real(np.fft.ifft2(ft)), atol=1e-6)
    centred = projector.project(vol_ft, rot)
    moved = projector.shift_images(centred, -shifts)  # content by -origin = the particle
    np.testing.assert_allclose(moved, projector.project(vol_ft, rot, shifts), atol=1e-4 * np.abs(centred).max())


def write_relion_inputs(folder, vol, pixel_ang, eulers, origins_px, ctf_params=None):
    """Map + RELION 3.1 STAR (optics table, rlnOriginX/YAngst) for relion_project --ang."""
    with mrcfile.new(folder / "map.mrc", overwrite=True) as m:
        m.set_data(np.asarray(vol, np.float32))
        m.voxel_size = pixel_ang
    n = len(eulers)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [pixel_ang],
            "rlnImageSize": [vol.shape[0]],
            "rlnImageDimensionality": [2],
        }
    )
    parts = pd.DataFrame(
        {
            "rlnAngleRot": eulers[:, 0],
            "rlnAngleTilt": eulers[:, 1],
            "rlnAnglePsi": eulers[:, 2],
            "rlnOriginXAngst": origins_px[:, 0] * pixel_ang,
            "rlnOriginYAngst": origins_px[:, 1] * pixel_ang,
            "rlnOpticsGroup": [1] * n,
            "rlnImageName": [f"{i + 1:06d}@dummy.mrcs" for i in range(n)],
        }
    )
    if ctf_params is not None:
        for name, values in ctf_params.items():
            parts[name] = values
    starfile.write({"optics": optics, "particles": parts}, folder / "poses.star", overwrite=True)


def run_relion_project(folder, pixel_ang, extra=()):
    cmd = ["relion_project", "--i", "map.mrc", "--o", "proj", "--ang", "poses.star", "--angpix", str(pixel_ang)]
    subprocess.run([*cmd, *extra], cwd=folder, check=True, capture_output=True, timeout=120)
    return mrcfile.read(folder / "proj.mrcs")


@pytest.mark.skipif(shutil.which("relion_project") is None, reason="relion_project not installed")
def test_projector_matches_live_relion_project_on_random_poses_and_subpixel_origins(map64, tmp_path):
    vol = np.asarray(preprocess.fourier_crop_volume(map64, 48))
    pixel_ang = 3.0
    rng = np.random.default_rng(7)
    n = 8
    eulers = np.stack(
        [rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)], axis=1
    )
    origins = rng.uniform(-6, 6, (n, 2)).round(2)
    write_relion_inputs(tmp_path, vol, pixel_ang, eulers, origins)
    relion = run_relion_project(tmp_path, pixel_ang)
    rot = euler_to_matrix(eulers[:, 0], eulers[:, 1], eulers[:, 2])
    ours = np.asarray(projector.project(projector.prepare_volume(vol), rot, origins))
    scores = [ncc(a, b) for a, b in zip(ours, relion)]
    assert min(scores) >= NCC_MIN, scores
