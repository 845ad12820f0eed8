"""Multi-region training (balanced batches, RNG independence of regions, resume), prediction's
formulations, and a small learning test on separable synthetic classes."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepalign_cli.config import TrainConfig
from deepalign_cli.core import batches, cnn, coverage, inference, models, split, training
from deepalign_cli.io import checkpoints as ckpt
from deepalign_cli.errors import DeepAlignError

TINY = dict(conv_filters=(4, 8, 8), dense_units=16, batch_size=16, images_per_region=32, epochs=2,
            early_stopping_patience=0, min_positives=3)


def _data(n=60, box=16, n_labels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, box, box)).astype(np.float32), np.arange(n) % n_labels


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_balanced_batch_has_exactly_half_positives():
    pos = jnp.asarray(np.r_[np.arange(3), np.zeros(97, int)])
    neg = jnp.asarray(np.arange(3, 103))
    idx, y = batches.balanced_batch(jax.random.key(0), pos, jnp.int32(3), neg, jnp.int32(100), 128)
    idx, y = np.asarray(idx), np.asarray(y)
    assert y.sum() == 64 and set(idx[y == 1]) <= {0, 1, 2} and np.all(idx[y == 0] >= 3)


def test_validation_split_is_stratified_and_fixed_by_seed():
    labels = np.repeat(np.arange(4), [10, 20, 5, 50])
    tr, va = split.split_train_val(jax.random.key(1), labels, 0.2)
    assert np.bincount(labels[va]).tolist() == [2, 4, 1, 10]
    assert np.intersect1d(tr, va).size == 0 and tr.size + va.size == labels.size
    tr2, va2 = split.split_train_val(jax.random.key(1), labels, 0.2)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split.split_train_val(jax.random.key(2), labels, 0.2)[1])
    # a label's split depends on its own members only: dropping label 0 leaves label 3's unchanged
    keep = np.flatnonzero(labels != 0)
    _, va_sub = split.split_train_val(jax.random.key(1), labels[keep], 0.2)
    assert np.array_equal(keep[va_sub][labels[keep][va_sub] == 3], va[labels[va] == 3])
    # raw uint32 keys work too
    assert split.split_train_val(jax.random.PRNGKey(1), labels, 0.2)[1].size == va.size


def test_regions_trained_together_equal_each_trained_alone():
    images, labels = _data()
    cfg = TrainConfig(**TINY)
    together = training.train_regions(images, labels, [0, 1, 2], cfg, jax.random.key(5))
    alone = training.train_regions(images, labels, [1], cfg, jax.random.key(5))
    assert _leaves_equal(together[1]["params"], alone[1]["params"])
    assert together[1]["history"] == alone[1]["history"]
    assert not _leaves_equal(together[0]["params"], together[1]["params"])


def test_vmapped_regions_match_the_region_loop():
    images, labels = _data()
    loop = training.train_regions(images, labels, [0, 2], TrainConfig(**TINY, region_parallel="loop"), jax.random.key(5))
    vmap = training.train_regions(images, labels, [0, 2], TrainConfig(**TINY, region_parallel="vmap"), jax.random.key(5))
    # Compared through the networks' outputs: the conv biases in front of BatchNorm get a gradient
    # that is zero up to rounding, which Adam's normalisation turns into ±lr steps of either sign,
    # so those parameters legitimately differ between two summation orders; the outputs do not.
    for r in (0, 2):
        assert [h["train_loss"] for h in loop[r]["history"]] == pytest.approx([h["train_loss"] for h in vmap[r]["history"]], rel=1e-4)
    p_loop = inference.predict_probs(loop, images, batch_size=32)
    p_vmap = inference.predict_probs(vmap, images, batch_size=32)
    # training moved the probabilities by ~0.2 from their start; the formulations agree to 2.5 % of that
    assert np.max(np.abs(p_loop - p_vmap)) < 0.025 * np.max(np.abs(p_loop - 0.5))


def test_vmap_region_groups_fit_the_device_memory():
    h100 = 60 * 2**30  # JAX's pool on an H100: 42 regions at 120 px ran together there
    assert training.vmap_region_groups(range(42), 128, 120, 16, h100) == [list(range(42))]
    groups = training.vmap_region_groups(range(42), 128, 314, 16, h100)  # the spike box: 7 fit
    assert [len(g) for g in groups] == [7] * 6 and sum(groups, []) == list(range(42))
    assert training.vmap_region_groups(range(5), 128, 120, 16, None) == [list(range(5))]  # CPU: no limit
    assert training.vmap_region_groups([3, 8, 9], 128, 120, 16, 1) == [[3], [8], [9]]
    assert training.vmap_region_groups([], 128, 120, 16, h100) == []


def test_vmapped_training_in_region_groups_equals_one_group(monkeypatch):
    images, labels = _data()
    cfg = TrainConfig(**TINY, region_parallel="vmap")
    together = training.train_regions(images, labels, [0, 1, 2], cfg, jax.random.key(5))
    box = images.shape[1]
    # room for 2 regions' steps: groups [0, 1] and [2]
    monkeypatch.setattr(training.devices, "memory_bytes", lambda: int(2.5 * TINY["batch_size"] * box * box * TINY["conv_filters"][0] * 32 / 0.8))
    calls = []
    real = training._region_epoch_fn

    def spy(*a, **k):
        one, many = real(*a, **k)
        return one, lambda params, *rest: calls.append(jax.tree_util.tree_leaves(params)[0].shape[0]) or many(params, *rest)

    monkeypatch.setattr(training, "_region_epoch_fn", spy)
    grouped = training.train_regions(images, labels, [0, 1, 2], cfg, jax.random.key(5))
    assert calls == [2, 1] * TINY["epochs"]
    for r in (0, 1, 2):
        assert [h["train_loss"] for h in grouped[r]["history"]] == pytest.approx([h["train_loss"] for h in together[r]["history"]], rel=1e-4)
    np.testing.assert_allclose(inference.predict_probs(grouped, images, 32), inference.predict_probs(together, images, 32), atol=2e-3)


def test_same_seed_gives_identical_params_and_other_seed_differs():
    images, labels = _data()
    cfg = TrainConfig(**TINY)
    a = training.train_regions(images, labels, [0], cfg, jax.random.key(7))
    b = training.train_regions(images, labels, [0], cfg, jax.random.key(7))
    c = training.train_regions(images, labels, [0], cfg, jax.random.key(8))
    assert _leaves_equal(a[0]["params"], b[0]["params"])
    assert not _leaves_equal(a[0]["params"], c[0]["params"])


def test_checkpoint_bytes_round_trip_and_resume_equals_uninterrupted_run():
    images, labels = _data()
    cfg = TrainConfig(**TINY)
    saved = {}
    full = training.train_regions(images, labels, [0], cfg, jax.random.key(3),
                                  checkpoint_cb=lambda r, e, s: saved.__setitem__((r, e), ckpt.params_to_bytes(s)))
    entry = ckpt.params_from_bytes(ckpt.params_to_bytes(full[0]))
    assert entry["arch"] == full[0]["arch"] and entry["history"] == full[0]["history"]
    assert _leaves_equal(entry["params"], full[0]["params"])
    resumed = training.train_regions(images, labels, [0], cfg, jax.random.key(3),
                                     resume_state={0: ckpt.params_from_bytes(saved[(0, 0)])})
    assert _leaves_equal(resumed[0]["params"], full[0]["params"])
    assert resumed[0]["history"] == full[0]["history"]


def test_region_with_too_few_positives_is_skipped_with_a_warning():
    images, labels = _data()
    labels = labels.copy()
    labels[:2] = 9  # region 9: 2 particles, fewer than min_positives = 3
    out = training.train_regions(images, labels, [0, 9], TrainConfig(**TINY), jax.random.key(0))
    assert out[9]["params"] is None and "region 9" in out[9]["warning"]
    assert out[0]["params"] is not None


def test_predict_probs_shape_range_and_loop_equals_vmap():
    images, labels = _data()
    models = training.train_regions(images, labels, [0, 1, 2], TrainConfig(**{**TINY, "epochs": 1}), jax.random.key(0))
    loop = inference.predict_probs(models, images[:37], batch_size=16, region_parallel="loop")
    vmap = inference.predict_probs(models, images[:37], batch_size=16, region_parallel="vmap")
    assert loop.shape == (37, 3) and loop.dtype == np.float32 and np.all((loop >= 0) & (loop <= 1))
    np.testing.assert_allclose(loop, vmap, rtol=1e-4, atol=1e-5)


def test_auto_formulation_loops_on_one_device_and_vmaps_over_several_gpus(monkeypatch):
    # measured on one H100 at 120 px: one region alone 31,300 image-steps/s, 42 vmapped 22,600
    cfg = TrainConfig(**TINY)
    for backend, mesh, want in (("cpu", None, False), ("cpu", "mesh", False), ("gpu", None, False), ("gpu", "mesh", True)):
        monkeypatch.setattr(training.jax, "default_backend", lambda b=backend: b)
        monkeypatch.setattr(training.devices, "region_mesh", lambda m=mesh: m)
        assert training._use_vmap(cfg) is want, (backend, mesh)
        assert training._use_vmap(cfg.model_copy(update={"region_parallel": "vmap"})) is True
        assert training._use_vmap(cfg.model_copy(update={"region_parallel": "loop"})) is False


def test_vmap_chunk_fits_the_device_memory():
    # H100 (JAX's pool 60 GiB), 120 px, 42 FFT nets: 512 images ran out of memory, 256 ran
    h100 = 60 * 2**30
    assert 128 <= inference.vmap_chunk_size(512, 120, 16, 42, h100) < 256
    assert inference.vmap_chunk_size(512, 64, 16, 42, h100) == 512
    assert 1 <= inference.vmap_chunk_size(512, 314, 16, 42, h100) < 40  # the spike case
    assert inference.vmap_chunk_size(512, 120, 16, 42, None) == 512  # CPU: no device limit reported
    assert inference.vmap_chunk_size(512, 120, 16, 42, 1) == 1


def test_predict_vmap_chunks_by_device_memory_and_equals_the_loop(monkeypatch):
    images, labels = _data()
    models = training.train_regions(images, labels, [0, 1, 2], TrainConfig(**{**TINY, "epochs": 1}), jax.random.key(0))
    loop = inference.predict_probs(models, images[:37], batch_size=16, region_parallel="loop")
    box = images.shape[1]
    # a device that holds the 3 nets' activations for 5 images
    monkeypatch.setattr(inference.devices, "memory_bytes", lambda: int(5.5 * 3 * box * box * TINY["conv_filters"][0] * 32 / 0.8))
    seen = []
    real = inference.chunked_logits
    monkeypatch.setattr(inference, "chunked_logits", lambda fn, v, x, bs: seen.append(bs) or real(fn, v, x, bs))
    vmap = inference.predict_probs(models, images[:37], batch_size=16, region_parallel="vmap")
    assert seen == [5]
    np.testing.assert_allclose(loop, vmap, rtol=1e-4, atol=1e-5)


def test_predict_shared_first_layer_equals_loop_with_padded_groups():
    images, labels = _data()
    models_ = training.train_regions(images, labels, [0, 1, 2], TrainConfig(**{**TINY, "epochs": 1}), jax.random.key(0))
    loop = inference.predict_probs(models_, images[:37], batch_size=16, region_parallel="loop")
    box = images.shape[1]
    # groups of two nets (a budget for two nets' first-layer outputs): the second group is padded
    # with a repeat of its first net; and one group of all three
    two_nets_gb = 16 * (2 * 16 * TINY["conv_filters"][0] * box**2 * 4) / 2**30  # batch 16, float32
    for budget, members in ((two_nets_gb, [[0, 1], [2]]), (1.0, [[0, 1, 2]])):
        predictor = inference.prepare(models_, 16, "shared_first", memory_budget_gb=budget)
        assert predictor.formulation is inference.SHARED_FIRST
        groups = predictor.prepared[3]
        assert [g[0] for g in groups] == members and {g[1].shape[0] for g in groups} == {len(members[0])}
        np.testing.assert_allclose(inference.predict(predictor, images[:37]), loop, rtol=1e-4, atol=1e-5)


def test_auto_formulation_of_prediction_by_backend_and_first_layer():
    direct = cnn.build(cnn.architecture(TrainConfig(), 32), "direct")
    s2d = cnn.build(cnn.architecture(TrainConfig(), 32), "auto", "cpu")
    assert s2d.conv_impls[0] == "s2d"
    assert inference.choose_formulation(direct, False, "auto", "cpu") is inference.SHARED_FIRST
    assert inference.choose_formulation(s2d, False, "auto", "cpu") is inference.LOOP
    assert inference.choose_formulation(direct, False, "auto", "gpu") is inference.VMAP
    assert inference.choose_formulation(direct, True, "auto", "cpu") is inference.ONE_NET
    assert inference.choose_formulation(direct, False, "loop", "gpu") is inference.LOOP
    with pytest.raises(DeepAlignError, match="region_parallel"):
        inference.choose_formulation(direct, False, "vmap_pre", "cpu")


def test_top_k_and_cumulative_rules():
    probs = np.array([[0.1, 0.7, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    k2 = coverage.top_k_regions(probs, k=2)
    assert [list(a) for a in k2] == [[1, 2], [0, 1]]
    cum = coverage.top_k_regions(probs, cumulative_p=0.8)
    assert [list(a) for a in cum] == [[1, 2], [0, 1, 2, 3]]
    with pytest.raises(DeepAlignError):
        coverage.top_k_regions(probs)


def _shapes(n_per_class, box, rng):
    """Class 0: a filled disc; class 1: a thin ring of the same mean — rotation-invariant classes."""
    yy, xx = np.mgrid[:box, :box] - box // 2
    r = np.hypot(yy, xx)
    disc = (r < 7).astype(np.float32)
    ring = ((r > 9) & (r < 11)).astype(np.float32)
    ring *= disc.sum() / ring.sum()
    clean = np.concatenate([np.repeat(disc[None], n_per_class, 0), np.repeat(ring[None], n_per_class, 0)])
    noisy = clean + rng.normal(scale=0.7, size=clean.shape).astype(np.float32)
    noisy = (noisy - noisy.mean(axis=(1, 2), keepdims=True)) / noisy.std(axis=(1, 2), keepdims=True)
    return noisy.astype(np.float32), np.repeat([0, 1], n_per_class)


def test_separable_shapes_reach_high_validation_accuracy():
    """A disc and a ring (same total density) under noise of 0.7× the disc height: a radial profile
    separates them perfectly, chance is 0.5 (balanced accuracy). 80 validation images give a
    binomial std of ~0.03 at 0.95, so > 0.9 fails only if learning is broken."""
    images, labels = _shapes(200, 32, np.random.default_rng(0))
    cfg = TrainConfig(batch_size=32, images_per_region=480, epochs=4, early_stopping_patience=2)
    out = training.train_regions(images, labels, [0], cfg, jax.random.key(0))
    for r in [0]:
        best = out[r]["history"][out[r]["best_epoch"]]
        assert best["val_acc"] > 0.9, (r, out[r]["history"])


def _stepwise_reference(update, make_one, params, batch_stats, opt_state, data, key, n_steps):
    """An epoch one step at a time: each step's batch made alone from its key, then the update."""
    losses, accs = [], []
    for k in jax.random.split(key, n_steps):
        params, batch_stats, opt_state, loss, acc = update(params, batch_stats, opt_state, *make_one(*data, k))
        losses.append(loss)
        accs.append(acc)
    return params, batch_stats, opt_state, jnp.stack(losses).mean(0), jnp.stack(accs).mean(0)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pre_batched_epoch_equals_making_each_batch_alone():
    """The loop formulation makes its batches ahead in groups of steps (the last group padded).
    Same keys, so the same batches, and the same jitted update: the epoch is bit for bit the one
    whose batches are made one step at a time (equal in 40 of 40 seeds measured). A tolerance
    would not do: a rounding difference in a batch can flip a max-pool or ReLU tie and move the
    parameters by up to 1e-2 within 5 steps (measured 9.4e-3 between this and the fused step,
    whose batch making XLA fuses with the network)."""
    box, n_steps, batch = 16, 5, 8
    cfg = TrainConfig(batch_size=batch, conv_filters=(4, 8, 8), dense_units=16)
    model = models.build(cnn.architecture(cfg, box, 1), "auto")
    v = training.init_region_params(jax.random.key(0), cfg, box, 1)[0]
    opt = optax.adam(1e-3).init(v["params"])
    images = jax.random.normal(jax.random.key(1), (40, box, box))
    pos, neg = jnp.arange(10, dtype=jnp.int32), jnp.arange(10, 40, dtype=jnp.int32)
    data = (images, pos, jnp.int32(10), neg, jnp.int32(30), None, jnp.int32(0))  # no synthetic generator, region 0
    epoch, _ = training._region_epoch_fn(model, 1e-3, n_steps, batch, 1.0)
    grouped = training._pre_batched_epoch(jax.jit(training._region_update_body(model, 1e-3)),
                                          jax.jit(jax.vmap(partial(batches.region_batch, batch_size=batch, max_shift_px=1.0),
                                                           in_axes=(None,) * 7 + (0,))), n_steps, batch, 2)
    make_one = jax.jit(partial(batches.region_batch, batch_size=batch, max_shift_px=1.0))
    ref = _stepwise_reference(jax.jit(training._region_update_body(model, 1e-3)), make_one, v["params"], v["batch_stats"], opt,
                              data, jax.random.key(2), n_steps)
    _assert_trees_equal(epoch(v["params"], v["batch_stats"], opt, *data, jax.random.key(2)), ref)
    _assert_trees_equal(grouped(v["params"], v["batch_stats"], opt, *data, jax.random.key(2)), ref)  # groups of 2, last padded
    changed = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda p, q: float(jnp.abs(p - q).max()), v["params"], ref[0]))
    assert max(changed) > 1e-4  # the steps did update the net


def test_trunk_pre_batched_epoch_equals_making_each_batch_alone():
    box, n_steps, batch, heads = 16, 3, 8, 3
    cfg = TrainConfig(batch_size=batch, model="polar_trunk", conv_filters=(4, 8, 8), dense_units=16)
    model = models.build(models.architecture(cfg, box, heads), "auto")
    v = training.init_region_params(jax.random.key(0), cfg, box, heads)[0]
    opt = optax.adam(1e-3).init(v["params"])
    images = jax.random.normal(jax.random.key(1), (30, box, box))
    labels = jnp.arange(30, dtype=jnp.int32) % heads
    members = jnp.stack([jnp.flatnonzero(labels == h, size=10) for h in range(heads)]).astype(jnp.int32)
    data = (images, members, jnp.full(heads, 10, jnp.int32), labels, jnp.arange(heads, dtype=jnp.int32), None)
    make_one = jax.jit(partial(batches.trunk_batch, batch_size=batch, max_shift_px=1.0))
    ref = _stepwise_reference(jax.jit(training._trunk_update_body(model, 1e-3)), make_one, v["params"], v["batch_stats"], opt,
                              data, jax.random.key(2), n_steps)
    got = training._trunk_epoch_fn(model, 1e-3, n_steps, batch, 1.0)(v["params"], v["batch_stats"], opt, *data, jax.random.key(2))
    assert got[3].shape == (heads,)  # per-head training loss
    _assert_trees_equal(got, ref)
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda p, q: float(jnp.abs(p - q).max()), v["params"], got[0]))
    assert max(moved) > 1e-4
