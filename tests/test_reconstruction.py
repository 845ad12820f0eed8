"""Fourier reconstruction and FSC, checked against the projector on the ribosome map (32 px)."""

import jax
import mrcfile
import numpy as np
import pytest

from deepalign_cli.core import geometry, preprocess, projector
from deepalign_cli.core import reconstruction as rec
from deepalign_cli.core.ctf import ctf_2d

MAP = "/work/shared/data/ribosome70S_65.mrc"
BOX = 32
PIXEL = 5.0 * 65 / BOX
N_VIEWS = 600
CTF_KW = dict(voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def data():
    """Noise-free projections at random poses (uniform directions) with origins ≤ 3 px."""
    vol = np.asarray(preprocess.fourier_crop_volume(mrcfile.read(MAP).astype(np.float32), BOX))
    rng = np.random.default_rng(0)
    d = rng.normal(size=(N_VIEWS, 3))
    rot, tilt = geometry.direction_to_angles(d / np.linalg.norm(d, axis=1, keepdims=True))
    eulers = np.stack([rot, tilt, rng.uniform(-180, 180, N_VIEWS)], axis=1)
    origins = rng.uniform(-3, 3, (N_VIEWS, 2)).astype(np.float32)
    ft = projector.project_ft(projector.prepare_volume(vol), geometry.eulers_to_matrices(eulers).astype(np.float32), origins)
    defocus = rng.uniform(10000, 25000, N_VIEWS)
    ctf = np.asarray(ctf_2d(BOX, PIXEL, defocus, defocus, 0.0, **CTF_KW))
    return {
        "vol": vol,
        "eulers": eulers,
        "origins": origins,
        "images": np.real(np.fft.ifft2(np.asarray(ft))).astype(np.float32),
        "ctf_images": np.real(np.fft.ifft2(np.asarray(ft) * ctf)).astype(np.float32),
        "ctf_params": dict(defocus_u_ang=defocus, defocus_v_ang=defocus, defocus_angle_deg=np.zeros(N_VIEWS), **CTF_KW),
    }


def test_reconstruction_from_true_poses_gives_back_the_map(data):
    vol = rec.reconstruct(data["images"], data["eulers"], data["origins"])
    assert vol.shape == (BOX,) * 3 and vol.dtype == np.float32
    assert _corr(vol, data["vol"]) > 0.99


def test_ctf_correction_restores_the_map(data):
    corrected = rec.reconstruct(data["ctf_images"], data["eulers"], data["origins"], data["ctf_params"], PIXEL)
    uncorrected = rec.reconstruct(data["ctf_images"], data["eulers"], data["origins"])
    assert _corr(corrected, data["vol"]) > 0.98
    assert _corr(corrected, data["vol"]) > _corr(uncorrected, data["vol"]) + 0.05


def test_half_maps_of_noise_free_data_reach_near_nyquist(data):
    out = rec.reconstruct_halves(data["images"], data["eulers"], data["origins"], jax.random.key(0))
    assert np.bincount(out["half"]).tolist() == [N_VIEWS // 2, N_VIEWS // 2]
    freqs, curve = rec.fsc(out["half1"], out["half2"])
    nyquist_res = 2 * PIXEL
    assert np.all(curve[freqs <= 0.8 * 0.5] >= 0.143)
    assert rec.resolution_at(freqs, curve, PIXEL) <= nyquist_res / 0.8
    assert _corr(out["map"], data["vol"]) > 0.99


def test_fsc_of_a_map_with_itself_is_one(data):
    freqs, curve = rec.fsc(data["vol"], data["vol"])
    assert freqs.shape == (BOX // 2 + 1,) and freqs[-1] == pytest.approx(0.5)
    np.testing.assert_allclose(curve, 1.0, atol=1e-9)


def test_fsc_of_independent_noise_is_near_zero():
    a, b = np.random.default_rng(1).normal(size=(2, BOX, BOX, BOX))
    _, curve = rec.fsc(a, b)
    assert np.all(np.abs(curve[2:]) < 0.2)


def test_resolution_interpolates_the_threshold_crossing():
    freqs = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    curve = np.array([1.0, 0.9, 0.5, 0.1, 0.0, 0.0])
    # 0.143 is crossed between 0.2 (0.5) and 0.3 (0.1): f = 0.2 + 0.357/0.4 · 0.1 = 0.28925
    assert rec.resolution_at(freqs, curve, 2.0) == pytest.approx(2.0 / 0.289250, rel=1e-4)
    assert rec.resolution_at(freqs, np.ones(6), 2.0) == pytest.approx(4.0)


def _full_plane_insertion(images, eulers, origins, pad=2):
    """Reference: every frequency of each padded image's full 2D transform inserted by trilinear
    gridding, one sample at a time (numpy, no symmetry shortcut)."""
    n = images.shape[-1]
    m = pad * n
    num, wt = np.zeros((m, m, m), complex), np.zeros((m, m, m))
    k = np.fft.fftfreq(m) * m
    ky, kx = np.meshgrid(k, k, indexing="ij")
    for img, rot, o in zip(images, geometry.eulers_to_matrices(eulers), origins):
        p = np.zeros((m, m))
        s = m // 2 - n // 2
        p[s : s + n, s : s + n] = img
        f = np.fft.fft2(np.fft.ifftshift(p)) * np.exp(-2j * np.pi / m * (kx * o[0] + ky * o[1]))
        for a, b in zip(*np.nonzero(kx**2 + ky**2 <= (m / 2) ** 2)):
            c = m // 2 + (kx[a, b] * rot[0] + ky[a, b] * rot[1])[::-1]
            c0 = np.floor(c).astype(int)
            fr = c - c0
            for d in np.ndindex(2, 2, 2):
                idx = c0 + d
                if np.all((idx >= 0) & (idx < m)):
                    w = np.prod([fr[i] if d[i] else 1 - fr[i] for i in range(3)])
                    num[tuple(idx)] += w * f[a, b]
                    wt[tuple(idx)] += w
    return num, wt


def test_half_plane_insertion_with_friedel_completion_equals_full_plane_insertion():
    """backproject inserts only kx ≥ 0 and mirrors the grid: the same grids as inserting every
    frequency (inside the Nyquist sphere; on it the ±Nyquist aliases are split evenly)."""
    rng = np.random.default_rng(3)
    images = rng.normal(size=(3, 8, 8)).astype(np.float32)
    eulers = np.stack([rng.uniform(-180, 180, 3), rng.uniform(0, 180, 3), rng.uniform(-180, 180, 3)], 1)
    origins = rng.uniform(-1.5, 1.5, (3, 2)).astype(np.float32)
    num, wt = (np.asarray(g) for g in rec.backproject(images, eulers, origins, chunk=2))
    num_ref, wt_ref = _full_plane_insertion(images, eulers, origins)
    k = np.arange(16) - 8
    inner = (k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) < 6**2
    assert np.abs(wt_ref[inner]).max() > 0.5 and np.abs(num_ref[inner]).max() > 1.0  # the comparison is not vacuous
    np.testing.assert_allclose(num[inner], num_ref[inner], atol=2e-5 * np.abs(num_ref).max())
    np.testing.assert_allclose(wt[inner], wt_ref[inner], atol=2e-5 * np.abs(wt_ref).max())
