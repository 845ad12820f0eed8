"""`simulate --noise-micrograph`: noise cut from a real micrograph instead of white Gaussian noise."""

from pathlib import Path

import jax
import mrcfile
import numpy as np
import pytest

from conftest import SIM_ARGS, run_deepalign
from deepalign_cli.core import simulate
from deepalign_cli.io import mrc, star

MICROGRAPH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "micrograph_noise" / "fei_extended_1.668A_1024.mrc"


def _normalised(x):
    x = x - x.mean()
    return x / x.std()


def _square_symmetries(x):
    turns = [np.rot90(x, k) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def test_crops_are_windows_of_the_micrograph_under_the_square_symmetries():
    """Every crop is a normalised window of the micrograph, turned by k·90° and maybe mirrored;
    over 300 crops every position along the free axis and all 8 symmetries occur."""
    rng = np.random.default_rng(0)
    mic = rng.normal(size=(36, 32)).astype(np.float32)  # 5 window positions along y, 1 along x
    crops = np.asarray(simulate.micrograph_noise(jax.random.key(1), mic, 300, 32))
    assert crops.shape == (300, 32, 32) and crops.dtype == np.float32
    np.testing.assert_allclose(crops.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(crops.std(axis=(1, 2)), 1, rtol=1e-4)
    windows = [_normalised(mic[y : y + 32]) for y in range(5)]
    seen = set()
    for c in crops:
        hits = [(y, s) for y, w in enumerate(windows) for s, t in enumerate(_square_symmetries(w)) if np.allclose(c, t, atol=1e-4)]
        assert hits, "a crop that is no window of the micrograph"
        seen.update(hits)
    assert {y for y, _ in seen} == set(range(5)) and {s for _, s in seen} == set(range(8))


def test_resampling_keeps_a_band_limited_pattern_at_the_new_pixel_size():
    y, x = np.mgrid[:64, :80] / 1.0
    mic = (np.cos(2 * np.pi * 3 * x / 80) + np.sin(2 * np.pi * 5 * y / 64)).astype(np.float32)
    coarse = simulate.resample_micrograph(mic, 1.0, 2.0)  # half the pixels, the same pattern
    assert coarse.shape == (32, 40)
    y2, x2 = np.mgrid[:32, :40] / 1.0
    np.testing.assert_allclose(coarse, np.cos(2 * np.pi * 3 * x2 / 40) + np.sin(2 * np.pi * 5 * y2 / 32), atol=1e-4)
    fine = simulate.resample_micrograph(mic, 1.0, 0.5)  # zero-padded spectrum: the pattern on a finer grid
    assert fine.shape == (128, 160)
    np.testing.assert_allclose(fine[::2, ::2], mic, atol=1e-4)
    np.testing.assert_array_equal(simulate.resample_micrograph(mic, 1.0, 1.0005), mic)  # within 0.1 %: as it is


def _low_to_high_power(images):
    box = images.shape[-1]
    power = np.abs(np.fft.fft2(np.asarray(images))) ** 2
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(box) * box, np.fft.fftfreq(box) * box, indexing="ij"))
    return power[:, (k > 0) & (k <= box / 8)].mean() / power[:, (k >= 3 * box / 8) & (k <= box / 2)].mean()


def test_real_micrograph_noise_is_coloured_unlike_white_noise():
    """The micrograph's power falls with frequency (ice, its CTF envelope): at 10.2 Å/px the power
    below 1/4 Nyquist is 1.91–1.93× that near Nyquist (3 seeds × 500 crops), white noise's
    0.99–1.004; the bounds below leave room for the draw."""
    image, pixel = mrc.read_image(MICROGRAPH)
    assert image.shape == (1024, 1024) and pixel == pytest.approx(1.668, abs=1e-3)
    mic = simulate.resample_micrograph(image, pixel, 10.15625)
    assert mic.shape == (168, 168)
    coloured = simulate.micrograph_noise(jax.random.key(0), mic, 500, 32)
    white = jax.random.normal(jax.random.key(0), (500, 32, 32))
    assert _low_to_high_power(coloured) > 1.6
    assert 0.9 < _low_to_high_power(white) < 1.1


def test_cli_simulates_with_micrograph_noise_at_the_requested_snr(tmp_path):
    """Same poses as white noise for the same seed; the noise (noisy − clean) has the requested
    variance ratio and is coloured; the config records the micrograph."""
    noisy, clean, white = tmp_path / "mic", tmp_path / "clean", tmp_path / "white"
    run_deepalign("simulate", noisy, *SIM_ARGS, "--snr", "0.1", "--noise-micrograph", MICROGRAPH, check=True)
    run_deepalign("simulate", clean, *SIM_ARGS, "--snr", "1e6", "--noise-micrograph", MICROGRAPH, check=True)
    out = run_deepalign("simulate", white, *SIM_ARGS, "--snr", "0.1", check=True)
    assert "(white noise)" in out.stderr
    a = mrcfile.read(noisy / "simulated" / "particles.mrcs").astype(np.float64)
    c = mrcfile.read(clean / "simulated" / "particles.mrcs").astype(np.float64)
    assert c.var() / (a - c).var() == pytest.approx(0.1, rel=0.02)  # σ from the first chunk's clean variance
    assert _low_to_high_power(a - c) > 1.6
    t_mic = star.read_particles(noisy / "simulated" / "truth.star").particles
    t_white = star.read_particles(white / "simulated" / "truth.star").particles
    assert t_mic.equals(t_white)
    assert str(MICROGRAPH) in (noisy / "project.yaml").read_text()


@pytest.mark.parametrize("case", ["missing", "3d-map", "too-small", "no-pixel-size"])
def test_bad_noise_micrograph_is_one_line_error_and_writes_nothing(tmp_path, case):
    path = tmp_path / "mic.mrc"
    if case == "3d-map":
        mrc.write_map(path, np.zeros((8, 8, 8), np.float32), 10.0)
    elif case == "too-small":
        with mrcfile.new(path) as m:  # 40 px at 2 Å/px → 8 px at the particles' 10.2 Å/px
            m.set_data(np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32))
            m.voxel_size = 2.0
    elif case == "no-pixel-size":
        with mrcfile.new(path) as m:
            m.set_data(np.zeros((64, 64), np.float32))
    project = tmp_path / "P"
    r = run_deepalign("simulate", project, *SIM_ARGS, "--noise-micrograph", path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(path) in r.stderr
    assert {"missing": "file not found", "3d-map": "expected one 2D micrograph", "too-small": "smaller than the 32-px box",
            "no-pixel-size": "no pixel size"}[case] in r.stderr
    assert not project.exists()
