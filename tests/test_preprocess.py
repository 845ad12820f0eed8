"""Preprocessing (crop, normalise, low-pass, noise, CTF) and particle simulation."""

import jax
import numpy as np
import pytest

from deepalign_cli.core import ctf, preprocess, projector, simulate
from deepalign_cli.core.geometry import eulers_to_matrices


def blob_volume(n=32):
    """Two off-centre Gaussian blobs: asymmetric, smooth, (n, n, n) float32."""
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    vol = np.exp(-((x - 3) ** 2 + y**2 + (z + 2) ** 2) / 8.0)
    vol += 0.5 * np.exp(-((x + 4) ** 2 + (y - 5) ** 2 + z**2) / 4.0)
    return vol.astype(np.float32)


def random_images(n=4, box=32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


def test_fourier_crop_keeps_mean_and_low_frequencies():
    imgs = random_images() + 3.0
    small = np.asarray(preprocess.fourier_crop(imgs, 16))
    assert small.shape == (4, 16, 16)
    np.testing.assert_allclose(small.mean(axis=(1, 2)), imgs.mean(axis=(1, 2)), rtol=1e-5)
    # every frequency |k| < 8 keeps its value (FTs of centred images, scaled by pixel count)
    big_ft = np.fft.fft2(np.fft.ifftshift(imgs, axes=(1, 2))) / 32**2
    small_ft = np.fft.fft2(np.fft.ifftshift(small, axes=(1, 2))) / 16**2
    for ky, kx in [(0, 1), (3, -2), (-7, 5), (6, 6)]:
        np.testing.assert_allclose(small_ft[:, ky, kx], big_ft[:, ky, kx], atol=1e-5)


def test_fourier_crop_volume_keeps_mean_and_shape():
    vol = blob_volume(32)
    small = np.asarray(preprocess.fourier_crop_volume(vol, 20))
    assert small.shape == (20, 20, 20)
    assert small.mean() == pytest.approx(vol.mean(), rel=1e-4)
    # blob centre (z, y, x) = (-2, 0, 3) px at 32 → ·20/32 + 10 = (8.75, 10, 11.9) at 20
    assert np.unravel_index(small.argmax(), small.shape) == (9, 10, 12)


def test_projecting_into_a_smaller_box_equals_fourier_cropping_the_projection():
    vol_ft = projector.prepare_volume(blob_volume(32))
    rot = eulers_to_matrices(np.array([[30.0, 60.0, -20.0], [100.0, 120.0, 45.0]]))
    full = projector.project(vol_ft, rot)
    direct = np.asarray(projector.project(vol_ft, rot, out_box=16))
    cropped = np.asarray(preprocess.fourier_crop(full, 16))
    assert direct.shape == (2, 16, 16)
    np.testing.assert_allclose(direct, cropped, atol=0.02 * np.abs(cropped).max())


def test_downsample_to_pixel_picks_even_box_and_reports_actual_pixel():
    imgs = random_images(box=64)
    out, pixel = preprocess.downsample_to_pixel(imgs, 1.0, 2.9)
    assert out.shape == (4, 22, 22) and pixel == pytest.approx(64 / 22)
    same, pixel_same = preprocess.downsample_to_pixel(imgs, 2.0, 1.0)  # never upsamples
    assert same.shape == imgs.shape and pixel_same == 2.0
    assert preprocess.target_pixel(9.0) == pytest.approx(3.0)


def test_normalize_background_gives_background_mean_zero_std_one():
    rng = np.random.default_rng(1)
    imgs = (5.0 + 3.0 * rng.normal(size=(3, 40, 40))).astype(np.float32)
    imgs[:, 15:25, 15:25] += 50.0  # a bright particle inside the mask
    out = np.asarray(preprocess.normalize_background(imgs, radius_frac=0.75))
    yy, xx = np.mgrid[:40, :40] - 20
    bg = np.hypot(yy, xx) > 0.75 * 20
    np.testing.assert_allclose(out[:, bg].mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, bg].std(axis=1), 1.0, rtol=1e-4)
    assert out[:, 20, 20].min() > 10  # the particle is not part of the statistics


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_lowpass_removes_power_beyond_cutoff_and_keeps_low_frequencies(spatial_dims):
    box, pixel, res = 32, 2.0, 8.0  # cut-off radius 32·2/8 = 8 Fourier px
    shape = (3,) + (box,) * 2 if spatial_dims == 2 else (box,) * 3
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    if spatial_dims == 2:
        out = np.asarray(preprocess.lowpass(x, pixel, res, soft_edge_px=2))
    else:
        out = np.asarray(preprocess.lowpass_volume(x, pixel, res, soft_edge_px=2))
    axes = tuple(range(-spatial_dims, 0))
    f_in, f_out = np.fft.fftn(x, axes=axes), np.fft.fftn(out, axes=axes)
    k = np.fft.fftfreq(box) * box
    r = np.sqrt(sum(g**2 for g in np.meshgrid(*([k] * spatial_dims), indexing="ij")))
    assert np.abs(f_out[..., r >= 8]).max() < 1e-3 * np.abs(f_in).max()
    np.testing.assert_allclose(f_out[..., r <= 6], f_in[..., r <= 6], atol=1e-3 * np.abs(f_in).max())


@pytest.mark.parametrize("per_image", [False, True])
def test_add_noise_reaches_requested_snr(per_image):
    vol_ft = projector.prepare_volume(blob_volume(32))
    clean = np.array(projector.project(vol_ft, eulers_to_matrices(np.zeros((200, 3)))))
    clean[::2] *= 3.0  # images of unequal power
    noisy = np.asarray(preprocess.add_noise(jax.random.key(0), clean, 0.5, per_image=per_image))
    noise = noisy - clean
    if per_image:
        snr = clean.var(axis=(1, 2)) / noise.var(axis=(1, 2))
        assert np.mean(snr) == pytest.approx(0.5, rel=0.02)
        np.testing.assert_allclose(snr, 0.5, rtol=0.25)  # 1024 noise pixels per image: ~4% spread
        assert noise[::2].std() / noise[1::2].std() == pytest.approx(3.0, rel=0.02)
    else:
        assert clean.var() / noise.var() == pytest.approx(0.5, rel=0.02)
        assert noise[::2].std() / noise[1::2].std() == pytest.approx(1.0, rel=0.02)


def test_apply_ctf_multiplies_in_fourier_space():
    imgs = random_images()
    c = ctf.ctf_2d(32, 2.0, 15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1)
    out = np.asarray(preprocess.apply_ctf(imgs, c))
    np.testing.assert_allclose(out, np.real(np.fft.ifft2(np.fft.fft2(imgs) * np.asarray(c))), atol=1e-5)
    np.testing.assert_allclose(preprocess.apply_ctf(imgs, np.ones((32, 32))), imgs, atol=1e-5)


SIM = dict(snr=0.2, defocus_range_ang=(10000.0, 20000.0), astigmatism_ang=800.0, voltage_kv=300.0, cs_mm=2.7,
           amplitude_contrast=0.1, bfactor_ang2=0.0, max_shift_px=3.0, ctf=True)


def test_simulate_returns_shapes_ranges_and_is_reproducible_per_key():
    vol = blob_volume(32)
    a = simulate.simulate_particles(jax.random.key(5), vol, 50, 4.0, **SIM, box=24, chunk=16)
    b = simulate.simulate_particles(jax.random.key(5), vol, 50, 4.0, **SIM, box=24, chunk=16)
    c = simulate.simulate_particles(jax.random.key(6), vol, 50, 4.0, **SIM, box=24, chunk=16)
    assert a["images"].shape == (50, 24, 24) and a["images"].dtype == np.float32
    assert a["pixel_size_ang"] == pytest.approx(4.0 * 32 / 24)
    e = a["eulers_deg"]
    assert e.shape == (50, 3) and a["origins_px"].shape == (50, 2)
    assert np.all((e[:, [0, 2]] >= -180) & (e[:, [0, 2]] < 180)) and np.all((e[:, 1] >= 0) & (e[:, 1] <= 180))
    assert np.all(np.abs(a["origins_px"]) <= 3.0)
    assert np.all(a["defocus_u_ang"] >= a["defocus_v_ang"]) and np.all(a["defocus_u_ang"] - a["defocus_v_ang"] <= 800)
    for name in ("images", "eulers_deg", "origins_px", "defocus_u_ang", "defocus_angle_deg"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.allclose(a["images"], c["images"])


def test_simulated_projection_directions_are_uniform_on_the_sphere():
    d = simulate.random_eulers_deg(jax.random.key(0), 20000)
    cos_tilt = np.cos(np.radians(np.asarray(d[:, 1])))
    counts, _ = np.histogram(cos_tilt, bins=4, range=(-1, 1))
    np.testing.assert_allclose(counts / 20000, 0.25, atol=0.015)


def test_clean_simulation_is_the_shifted_ctf_modulated_projection():
    vol = blob_volume(32)
    sim = simulate.simulate_particles(jax.random.key(1), vol, 5, 3.0, **{**SIM, "snr": float("inf")}, chunk=4)
    rot = eulers_to_matrices(sim["eulers_deg"])
    ft = projector.project_ft(projector.prepare_volume(vol), rot, sim["origins_px"])
    c = ctf.ctf_2d(32, 3.0, sim["defocus_u_ang"], sim["defocus_v_ang"], sim["defocus_angle_deg"], 300.0, 2.7, 0.1)
    expected = np.real(np.fft.ifft2(np.asarray(ft) * np.asarray(c)))
    np.testing.assert_allclose(sim["images"], expected, atol=1e-4 * np.abs(expected).max())


def test_centre_crop_or_pad_keeps_the_centre_voxel():
    from deepalign_cli.core.preprocess import centre_crop_or_pad_volume

    vol = np.zeros((9, 9, 9), np.float32)
    vol[4, 4, 4] = 1.0
    padded = centre_crop_or_pad_volume(vol, 16)
    assert padded.shape == (16, 16, 16) and padded[8, 8, 8] == 1.0 and padded.sum() == 1.0
    cropped = centre_crop_or_pad_volume(padded, 6)
    assert cropped.shape == (6, 6, 6) and cropped[3, 3, 3] == 1.0
