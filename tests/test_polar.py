"""The rotation-invariant polar trunk (`core/polar.py`): polar sampling conventions, circular
convolutions, exact invariance of the logits to quarter turns, training, prediction and
checkpoints, and the CLI (`train --model polar_trunk`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepalign_cli.config import TrainConfig
from deepalign_cli.core import augment, cnn, inference, models, polar, training
from deepalign_cli.io import checkpoints as ckpt
from deepalign_cli.errors import DeepAlignError

BOX = 31  # odd: np.rot90 turns about pixel (15, 15), the polar grid's centre; n_theta = 64


def _images(n=4, box=BOX, seed=0):
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


def test_grid_shape():
    assert polar.grid_shape(32) == (16, 64)
    assert polar.grid_shape(31) == (15, 64)
    assert polar.grid_shape(16) == (8, 32)


def test_quarter_turn_of_the_image_is_a_quarter_shift_along_theta():
    x = _images()
    p = np.asarray(polar.to_polar(jnp.asarray(x)))
    p_rot = np.asarray(polar.to_polar(jnp.asarray(np.rot90(x, axes=(1, 2)).copy())))
    n_theta = p.shape[2]
    np.testing.assert_allclose(p_rot, np.roll(p, -n_theta // 4, axis=2), atol=1e-4)  # float32 sin/cos
    assert not np.allclose(p_rot, p, atol=1e-2)


def test_angle_offset_shifts_theta_and_matches_the_augmenter_rotation():
    x = _images()
    n_theta = polar.grid_shape(BOX)[1]
    base = np.asarray(polar.to_polar(jnp.asarray(x)))
    m = 5
    shifted = polar.to_polar(jnp.asarray(x), jnp.full((4,), 2 * np.pi * m / n_theta))
    np.testing.assert_allclose(np.asarray(shifted), np.roll(base, -m, axis=2), atol=1e-4)
    # sampling at θ + a is sampling the image turned by +a (augment's sense: positive = np.rot90)
    turned = augment.rotate_shift(jnp.asarray(x), jnp.full((4,), 90.0), jnp.zeros((4, 2)))
    np.testing.assert_allclose(np.asarray(polar.to_polar(turned)),
                               np.asarray(polar.to_polar(jnp.asarray(x), jnp.full((4,), np.pi / 2))), atol=1e-4)


def test_shift_moves_the_sampling_centre():
    x = np.zeros((1, BOX, BOX), np.float32)
    x[0, 15 + 3, 15 - 2] = 1.0  # a spike 3 px down, 2 px left of the centre
    p = np.asarray(polar.to_polar(jnp.asarray(x), shifts_px=jnp.asarray([[3.0, -2.0]])))
    assert p[0, 0].max() > 0.5  # now on the innermost ring
    assert np.asarray(polar.to_polar(jnp.asarray(x)))[0, 0].max() == 0.0


@pytest.mark.parametrize("impl", ["direct", "s2d", "fft"])
def test_circular_conv_equals_a_same_conv_of_the_periodic_signal(impl):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 16, 3)).astype(np.float32))
    conv = cnn.Conv(5, 5, impl)
    v = conv.init(jax.random.key(0), x)
    got = polar.circular_conv(lambda z: conv.apply(v, z), x, 5)
    tiled = jnp.concatenate([x, x, x], axis=2)  # one period on each side, then the middle third
    want = conv.apply(v, tiled)[:, :, 16:32]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
    assert got.shape == (2, 6, 16, 5)


def test_logits_are_invariant_to_quarter_turns_and_depend_on_the_image():
    cfg = TrainConfig(model="polar_trunk", conv_filters=(4, 8, 8), dense_units=16)
    arch = polar.architecture(cfg, BOX, 3)
    model = models.build(arch, "auto")
    assert isinstance(model, polar.PolarCNN)
    v = cnn.init_variables(jax.random.key(0), model, BOX)
    rng = np.random.default_rng(2)  # non-trivial running statistics, so the eval-mode path is general
    v["batch_stats"] = {layer: {"mean": jnp.asarray(rng.normal(0, 0.05, st["mean"].shape), jnp.float32),
                                "var": jnp.asarray(rng.uniform(0.5, 1.5, st["var"].shape), jnp.float32)}
                        for layer, st in v["batch_stats"].items()}
    x = _images(6)
    logits = lambda imgs: np.asarray(model.apply(v, jnp.asarray(imgs)[..., None], train=False))
    base = logits(x)
    for k in (1, 2, 3):
        np.testing.assert_allclose(logits(np.rot90(x, k, axes=(1, 2)).copy()), base, atol=1e-4)
    assert np.ptp(base, axis=0).min() > 1e-3  # different images, different logits
    assert not np.allclose(logits(x[:, ::-1].copy()), base, atol=1e-3)  # a mirror image is not a rotation


def test_architecture_refuses_boxes_too_small_for_three_pools():
    cfg = TrainConfig(model="polar_trunk")
    assert polar.architecture(cfg, 16, 2)["kernels"] == [3, 3, 3]
    assert polar.architecture(cfg, 32, 2)["kernels"] == [7, 3, 3]
    with pytest.raises(DeepAlignError, match="at least 16 px"):
        polar.architecture(cfg, 14, 2)


def _shapes(n_per_class, box, rng):
    """Three classes told apart by their radial profile: a disc, a thin ring, and a disc with an
    off-centre bump (the bump's angle random: classes are rotation-invariant by construction)."""
    yy, xx = np.mgrid[:box, :box] - box // 2
    r = np.hypot(yy, xx)
    disc = (r < 7).astype(np.float32)
    ring = ((r > 9) & (r < 11)).astype(np.float32) * disc.sum() / ((r > 9) & (r < 11)).sum()
    out, lab = [], []
    for c in range(3):
        for _ in range(n_per_class):
            if c == 2:
                a = rng.uniform(0, 2 * np.pi)
                img = 0.5 * disc + 2.0 * (np.hypot(yy - 10 * np.sin(a), xx - 10 * np.cos(a)) < 3)
            else:
                img = (disc, ring)[c]
            out.append(img + rng.normal(scale=0.7, size=img.shape))
            lab.append(c)
    x = np.asarray(out, np.float32)
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / x.std(axis=(1, 2), keepdims=True)
    return x.astype(np.float32), np.asarray(lab)


def test_polar_trunk_learns_trains_predicts_and_round_trips():
    """Three rotation-invariant classes under noise 0.7× the disc height: chance is 0.5 balanced
    accuracy per head; ~53 validation images per class give a binomial σ ≈ 0.04 at 0.9, so a best
    epoch > 0.85 on every head fails only if learning is broken."""
    images, labels = _shapes(130, 32, np.random.default_rng(0))
    cfg = TrainConfig(model="polar_trunk", batch_size=32, images_per_region=640, epochs=4, early_stopping_patience=0)
    out = training.train_regions(images, labels, [0, 1, 2], cfg, jax.random.key(0))
    assert out[0]["arch"]["model"] == "polar_trunk" and [out[r]["head"] for r in (0, 1, 2)] == [0, 1, 2]
    for r in (0, 1, 2):
        assert max(h["val_acc"] for h in out[r]["history"]) > 0.85, (r, out[r]["history"])
    _, val = training.split_train_val(jax.random.key(0), labels, cfg.validation_fraction)
    probs = inference.predict_probs(out, images[val], batch_size=64)
    assert probs.shape == (val.size, 3) and probs.min() >= 0 and probs.max() <= 1
    assert (probs.argmax(1) == labels[val]).mean() > 0.8  # chance 1/3
    restored = {r: ckpt.params_from_bytes(ckpt.params_to_bytes(m)) for r, m in out.items()}
    np.testing.assert_allclose(inference.predict_probs(restored, images[val], batch_size=17), probs, atol=1e-5)
    # one region alone is still one polar net (predict's single-net path)
    one = training.train_regions(images, labels, [2], cfg.model_copy(update={"epochs": 1}), jax.random.key(0))
    assert inference.predict_probs(one, images[:5], batch_size=4).shape == (5, 1)


def test_polar_training_is_reproducible_by_seed():
    images, labels = _shapes(20, 16, np.random.default_rng(0))
    cfg = TrainConfig(model="polar_trunk", conv_filters=(4, 8, 8), dense_units=16, batch_size=16, images_per_region=32,
                      epochs=1, early_stopping_patience=0, min_positives=3)
    a, b = (training.train_regions(images, labels, [0, 1, 2], cfg, jax.random.key(s)) for s in (0, 0))
    c = training.train_regions(images, labels, [0, 1, 2], cfg, jax.random.key(1))
    leaves = lambda m: [np.asarray(x) for x in jax.tree_util.tree_leaves(m[0]["params"])]
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c)))


@pytest.mark.slow
def test_cli_trains_and_predicts_with_the_polar_trunk(sim_project_labelled, run_cli, tmp_path):
    p = sim_project_labelled
    cfg = tmp_path / "polar.yaml"
    cfg.write_text("train: {model: polar_trunk, epochs: 1, images_per_region: 64, batch_size: 16, min_positives: 1,"
                   " conv_filters: [4, 8, 8], dense_units: 16}\n")
    bad = run_cli("train", p, "--config", cfg, "--regions", "0-3")
    assert bad.returncode != 0 and "polar_trunk model trains all regions at once" in bad.stderr
    assert not (p / "train").exists() or not any((p / "train").glob("region_*"))
    run_cli("train", p, "--config", cfg, check=True)
    run_cli("predict", p, "--config", cfg, check=True)
    probs = np.load(p / "predict" / "probabilities.npy")
    assert probs.shape[0] == 200 and probs.shape[1] >= 1 and np.isfinite(probs).all()
    assert (probs >= 0).all() and (probs <= 1).all()


def test_slurm_refuses_to_shard_a_one_net_model(sim_project_labelled, run_cli, tmp_path):
    cfg = tmp_path / "polar.yaml"
    cfg.write_text("train: {model: polar_trunk}\n")
    r = run_cli("slurm", sim_project_labelled, "--stage", "train", "--shards", 4, "--config", cfg)
    assert r.returncode != 0 and "polar_trunk is one network for all regions" in r.stderr
    assert not (sim_project_labelled / "slurm").exists()
