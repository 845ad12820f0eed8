"""Synthetic training examples from the reference (core/synthetic.py, train.synthetic_fraction)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from deepalign_cli import main
from deepalign_cli.core import ctf as ctf_mod
from deepalign_cli.core import batches, geometry, preprocess, projector, regions, symmetry, synthetic
from deepalign_cli.io import mrc

SHIPPED = Path(__file__).resolve().parents[1] / "deepalign_cli" / "data" / "ribosome70S_65.mrc"
BOX, PIXEL = 32, 5.0 * 65 / 32


@pytest.fixture(scope="module")
def vol_ft():
    vol, _ = mrc.read_map(SHIPPED)
    return projector.prepare_volume(np.asarray(preprocess.fourier_crop_volume(vol, BOX)))


def _ctf_rows(n=5, seed=0):
    rng = np.random.default_rng(seed)
    du = rng.uniform(10000, 25000, n)
    params = {"defocus_u_ang": du, "defocus_v_ang": du - 200, "defocus_angle_deg": rng.uniform(0, 180, n), "voltage_kv": 300.0,
              "cs_mm": 2.7, "amplitude_contrast": 0.1}
    return synthetic.ctf_table(params, n)


def _generator(vol_ft, sym="C4"):
    ops = symmetry.symmetry_operators(sym)
    centres = regions.region_centres(30.0, ops)
    return synthetic.generator(vol_ft, centres, ops, pixel_ang=PIXEL, ctf_rows=_ctf_rows(), noise_power=np.ones(BOX), snr=0.1,
                               max_shift_px=2.0), centres, ops


def _nearest_region_ok(labels, eulers, centres, ops):
    """Each label is a nearest region of its pose's direction (float32 ties within 1e-3° allowed)."""
    dist = regions.direction_region_distances(geometry.eulers_to_matrices(np.asarray(eulers, float))[:, 2, :], centres, ops)
    return dist[np.arange(len(labels)), np.asarray(labels)] <= dist.min(axis=1) + 1e-3


def test_labels_are_the_regions_of_the_poses(vol_ft):
    gen, centres, ops = _generator(vol_ft)
    images, labels, eulers = jax.jit(synthetic.generate, static_argnums=2)(jax.random.key(0), gen, 300)
    assert images.shape == (300, BOX, BOX) and labels.shape == (300,)
    assert _nearest_region_ok(labels, eulers, centres, ops).all()
    assert len(np.unique(labels)) > 0.8 * len(centres)  # uniform poses reach (almost) every region


def test_a_per_region_nets_examples_come_half_from_its_regions_cap(vol_ft):
    """With a region, the first half of the poses look from the cap that holds the region: their
    labels are still the region of the pose, and most are positives (measured 0.58–0.73 of 200 over
    the 42 C1 regions at 30°, caps of 20–23°; the uniform half at most 0.05)."""
    gen, centres, ops = _generator(vol_ft, "C1")
    make = jax.jit(synthetic.generate, static_argnums=2)
    for r in (0, 17, 41):
        _, labels, eulers = make(jax.random.key(r), gen, 400, jnp.int32(r))
        labels = np.asarray(labels)
        assert _nearest_region_ok(labels, eulers, centres, ops).all()
        d = geometry.eulers_to_matrices(np.asarray(eulers, float))[:200, 2, :]
        assert (d @ centres[r] >= float(gen.cap_cos[r]) - 1e-5).all()  # inside the cap
        assert (labels[:200] == r).mean() > 0.45 and (labels[200:] == r).mean() < 0.1


def test_every_region_lies_inside_its_cap():
    ops = symmetry.symmetry_operators("C1")
    centres = regions.region_centres(30.0, ops)
    caps = synthetic.region_caps(centres, ops)
    dirs = np.random.default_rng(0).normal(size=(50000, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx, _ = regions.assign_regions(dirs, centres, ops)
    assert (np.einsum("ni,ni->n", dirs, centres[idx]) >= caps[idx] - 1e-9).all()
    assert (np.rad2deg(np.arccos(caps)) < 30.0).all()  # and the caps are not the whole sphere


def test_the_ctf_applied_is_the_drawn_particles_ctf(vol_ft):
    """With one CTF row and an infinite SNR, an image is the normalised CTF · projection of its pose."""
    row = _ctf_rows(1, seed=3)
    ops = symmetry.symmetry_operators("C1")
    gen = synthetic.generator(vol_ft, regions.region_centres(30.0, ops), ops, pixel_ang=PIXEL, ctf_rows=row, noise_power=np.ones(BOX),
                              snr=1e12, max_shift_px=0.0)
    images, _, eulers = synthetic.generate(jax.random.key(1), gen, 4)
    ft = projector.project_ft(vol_ft, geometry.eulers_to_matrices(eulers), jnp.zeros((4, 2)))
    c = ctf_mod.ctf_2d(BOX, PIXEL, *(jnp.asarray(row[:, i]) for i in range(len(synthetic.CTF_KEYS))))
    expect = preprocess.normalize_background(jnp.real(jnp.fft.ifft2(ft * c)))
    np.testing.assert_allclose(np.asarray(images), np.asarray(expect), atol=2e-4)
    # and not the CTF of another defocus
    other = ctf_mod.ctf_2d(BOX, PIXEL, *(jnp.asarray(row[:, i]) * (1.2 if i < 2 else 1.0) for i in range(len(synthetic.CTF_KEYS))))
    wrong = preprocess.normalize_background(jnp.real(jnp.fft.ifft2(ft * other)))
    assert np.abs(np.asarray(images) - np.asarray(wrong)).max() > 0.1


def test_noise_spectrum_matches_the_datas():
    """Pure noise (SNR → 0) made from a measured spectrum has that spectrum: per shell within 10 %
    (2,000 images of 32 px: ≥ 2,000 × 6 samples per shell, so the relative standard error of a
    shell's mean power is ≤ 1/sqrt(12,000) ≈ 0.9 %; 10 % leaves room for the normalisation)."""
    k = np.arange(BOX // 2 + 1 + 7, dtype=float)
    measured = 1.0 / (1.0 + (k / 5.0) ** 2) + 0.05  # coloured: 20× more power at low than high frequency
    measured[0] = 0.0
    ops = symmetry.symmetry_operators("C1")
    gen = synthetic.generator(_zero_ft(), regions.region_centres(30.0, ops), ops, pixel_ang=PIXEL, ctf_rows=None, noise_power=measured,
                              snr=1e-12, max_shift_px=0.0)
    images, _, _ = jax.jit(synthetic.generate, static_argnums=2)(jax.random.key(2), gen, 2000)
    got = synthetic.radial_power(np.asarray(images))
    shells = slice(1, BOX // 2)
    ratio = (got[shells] / got[shells].mean()) / (measured[shells] / measured[shells].mean())
    assert np.abs(ratio - 1).max() < 0.10, ratio


def _zero_ft():
    """A prepared map of one tiny voxel: its projections are nearly 0, so at an SNR of 1e-12 the
    images are the noise alone (normalised)."""
    vol = np.zeros((BOX,) * 3, np.float32)
    vol[BOX // 2, BOX // 2, BOX // 2] = 1e-6
    return projector.prepare_volume(vol)


def test_snr_estimate_recovers_the_simulated_snr(vol_ft):
    """Images made at SNR 0.1 with the true map as reference: the estimate is within 15 % of 0.1."""
    n = 400
    key = jax.random.key(4)
    eul = np.array(jax.random.uniform(key, (n, 3), minval=-180, maxval=180))
    eul[:, 1] = np.abs(eul[:, 1]) / 2
    rot = geometry.eulers_to_matrices(eul).astype(np.float32)
    clean = np.asarray(jnp.real(jnp.fft.ifft2(projector.project_ft(vol_ft, jnp.asarray(rot)))))
    sigma = np.sqrt(clean.var() / 0.1)
    images = clean + sigma * np.random.default_rng(5).normal(size=clean.shape).astype(np.float32)
    snr = synthetic.estimate_snr(images, vol_ft, eul, np.zeros((n, 2)), None)
    assert snr == pytest.approx(0.1, rel=0.15)


def invoke(*args):
    return CliRunner().invoke(main.app, [str(a) for a in args])


@pytest.mark.slow
def test_synthetic_examples_lift_a_classifier_trained_on_few_labels(tmp_path):
    """1,500 particles at SNR 0.05 with real micrograph noise, 150 labelled (3 per region), 32-px box,
    polar trunk: held-out top-2 hit rate with 90 % of every batch synthetic against none.
    Measured 2026-12-06: 0.054 without, 0.319 with (the 42 regions' chance is 0.048). The test
    asks for ≥ 3× the labels-only rate and ≥ 0.15."""
    proj = tmp_path / "p"
    mic = Path(__file__).resolve().parents[2] / "shared" / "data" / "micrograph_noise" / "fei_extended_1.668A_1024.mrc"
    assert invoke("simulate", proj, "--n-particles", 1500, "--snr", 0.05, "--pre-aligned-fraction", 0.1, "--seed", 11,
                  "--noise-micrograph", mic).exit_code == 0
    assert invoke("label", proj, "--subset", proj / "simulated" / "subset.star").exit_code == 0
    hit2 = {}
    for syn in (0.0, 0.9):
        cfg = tmp_path / f"cfg{syn}.yaml"
        cfg.write_text(yaml.safe_dump({"preprocess": {"target_resolution_ang": 30.0},
                                       "train": {"model": "polar_trunk", "epochs": 6, "images_per_region": 1024, "synthetic_fraction": syn},
                                       "predict": {"coverage": 0.95}}))
        r = invoke("train", proj, "--config", cfg, "--force")
        assert r.exit_code == 0, r.output
        assert invoke("predict", proj, "--config", cfg, "--force").exit_code == 0
        assert invoke("report", proj, "--truth", proj / "simulated" / "truth.star").exit_code == 0
        hit2[syn] = json.loads((proj / "report" / "report.json").read_text())["predict"]["hit_rate"]["2"]
    assert hit2[0.9] >= max(3 * hit2[0.0], 0.15), hit2


def test_synthetic_examples_train_only_never_validate(monkeypatch, vol_ft):
    """`predict --coverage` calibrates on train's validation particles: with a generator the
    validation part is exactly the real held-out particles, and the generator reaches training."""
    from deepalign_cli.config import TrainConfig
    from deepalign_cli.core import training

    seen = []
    monkeypatch.setattr(training, "_train_trunk", lambda data, active, cfg, key, model, arch, hooks, gen: seen.append((data, gen)) or {})
    rng = np.random.default_rng(0)
    images = rng.normal(size=(60, BOX, BOX)).astype(np.float32)
    labels = np.repeat(np.arange(6), 10)
    cfg = TrainConfig(model="polar_trunk", min_positives=1, synthetic_fraction=0.9)
    gen, _, _ = _generator(vol_ft)
    training.train_regions(images, labels, range(6), cfg, jax.random.key(0), generator=gen)
    training.train_regions(images, labels, range(6), cfg, jax.random.key(0))
    (with_gen, g), (without, none) = seen
    assert g is gen and none is None
    for a, b in zip(with_gen, without):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_with_synthetic_examples_the_trunk_trains_regions_without_labelled_particles(monkeypatch, vol_ft):
    """Region 5 has no labelled particle: skipped (a warning) on the labels alone, trained with a
    generator (which makes its positives); the per-region nets still need real positives."""
    from deepalign_cli.config import TrainConfig
    from deepalign_cli.core import training

    monkeypatch.setattr(training, "_train_trunk", lambda data, active, *a: {r: {"params": "trained"} for r in active})
    monkeypatch.setattr(training, "_train_per_region", lambda data, active, *a: {r: {"params": "trained"} for r in active})
    images = np.random.default_rng(0).normal(size=(60, BOX, BOX)).astype(np.float32)
    labels = np.repeat([0, 1, 2, 3, 4, 6], 10)
    gen, _, _ = _generator(vol_ft)
    trunk = TrainConfig(model="polar_trunk", synthetic_fraction=0.9)
    assert training.train_regions(images, labels, range(7), trunk, jax.random.key(0), generator=gen)[5]["params"] == "trained"
    assert training.train_regions(images, labels, range(7), trunk, jax.random.key(0))[5]["params"] is None
    nets = TrainConfig(model="per_region", synthetic_fraction=0.9)
    assert training.train_regions(images, labels, range(7), nets, jax.random.key(0), generator=gen)[5]["params"] is None


def test_a_trunk_batch_holds_new_synthetic_examples_every_step(vol_ft):
    """n_synthetic of the batch are made by the generator: their one-hot targets are their regions,
    and another step key makes other images (new examples every step, nothing stored)."""
    from functools import partial

    from deepalign_cli.core import polar

    gen, centres, ops = _generator(vol_ft)
    n_regions = len(centres)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(n_regions, BOX, BOX)), jnp.float32)
    labels = jnp.arange(n_regions, dtype=jnp.int32)
    members = labels[:, None]
    make = jax.jit(partial(batches.trunk_batch, batch_size=16, max_shift_px=1.0, n_synthetic=12))
    data = (images, members, jnp.ones(n_regions, jnp.int32), labels, labels, gen)
    x1, y1, _ = make(*data, jax.random.key(3))
    x2, _, _ = make(*data, jax.random.key(4))
    assert x1.shape == (16, *polar.grid_shape(BOX)) and y1.shape == (16, n_regions)
    np.testing.assert_array_equal(np.asarray(y1).sum(axis=1), 1.0)  # every image is a positive of exactly one head
    syn, syn_lab, _ = synthetic.generate(jax.random.fold_in(jax.random.key(3), 1), gen, 12)
    # the same examples as made alone, up to float32 rounding of the fused program (measured 1.3e-5)
    np.testing.assert_allclose(np.asarray(x1[4:]), np.asarray(polar.to_polar(syn)), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(y1[4:]).argmax(axis=1), np.asarray(syn_lab))
    assert np.abs(np.asarray(x1[4:] - x2[4:])).mean() > 0.1


def test_train_with_a_reference_at_a_coarser_pixel_is_refused_before_anything_is_written(sim_project_labelled, tmp_path):
    """The reference checks are align's: a map coarser than the working pixel is an error naming it."""
    from deepalign_cli.errors import DeepAlignError

    mrc.write_map(tmp_path / "coarse.mrc", np.ones((8, 8, 8), np.float32), 40.0)
    r = invoke("train", sim_project_labelled, "--synthetic-fraction", 0.5, "--reference", tmp_path / "coarse.mrc")
    assert isinstance(r.exception, DeepAlignError) and "coarse.mrc" in str(r.exception), r.output
    assert "coarser than the particles' working pixel" in str(r.exception)
    assert not (sim_project_labelled / "train").exists()
