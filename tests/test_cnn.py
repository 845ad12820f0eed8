"""The paper's region CNN: FFT and s2d convolutions, shapes, parameter count, batch norm, augmentation; models.py."""

from functools import partial

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from scipy.signal import correlate2d

from deepalign_cli.config import TrainConfig
from deepalign_cli.core import augment, cnn, inference, models


@pytest.mark.parametrize("impl", ["fft", "s2d"])
@pytest.mark.parametrize("k", [10, 6, 4, 3])
@pytest.mark.parametrize("cin,cout", [(3, 5), (1, 4), (1, 3)])  # (1, even): the paired-output FFT path
def test_fast_convs_equal_direct_conv_values_and_gradients(k, impl, cin, cout):
    """Also the FFT's channels-first output (what the network hands to its batch normalisation)."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 30, 30, cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) / k
    conv = cnn.CONVS[impl]
    direct, fast = cnn.conv2d_direct(x, w), conv(x, w)
    assert fast.shape == direct.shape == (2, 30, 30, cout)
    if impl == "fft":
        np.testing.assert_array_equal(np.asarray(cnn.conv2d_fft(x, w, channels_first_out=True).transpose(0, 2, 3, 1)),
                                      np.asarray(fast))
    assert float(jnp.max(jnp.abs(fast - direct))) < 1e-5 * float(jnp.max(jnp.abs(direct)))
    for arg in (0, 1):  # gradients with respect to the input and to the kernel
        g_direct = jax.grad(lambda x, w: jnp.sum(cnn.conv2d_direct(x, w) ** 2), argnums=arg)(x, w)
        g_fast = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=arg)(x, w)
        assert float(jnp.max(jnp.abs(g_fast - g_direct))) < 1e-4 * float(jnp.max(jnp.abs(g_direct)))


@pytest.mark.parametrize("shape", [(3, 8, 10, 4), (2, 7, 9, 3)])  # even and odd (last row/column dropped)
def test_max_pool2_equals_flax_max_pool_values_and_gradient(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # noqa: E731
    np.testing.assert_array_equal(np.asarray(cnn.max_pool2(x)), np.asarray(ref(x)))
    chw = cnn.max_pool2(x.transpose(0, 3, 1, 2), channels_first=True).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(chw), np.asarray(ref(x)))
    r = jax.random.normal(jax.random.key(2), ref(x).shape)
    g, g_ref = (jax.grad(lambda x, f=f: jnp.sum(f(x) * r))(x) for f in (cnn.max_pool2, ref))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-6)


class _FlaxBatchNormReluPool(nn.Module):
    """The unfused reference: Flax BatchNorm → ReLU → 2×2 max-pool."""

    @nn.compact
    def __call__(self, x, use_running_average):
        x = nn.BatchNorm(use_running_average=use_running_average, momentum=cnn.BATCH_NORM_MOMENTUM,
                         epsilon=cnn.BATCH_NORM_EPSILON, name="bn")(x)
        return nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="VALID")


@pytest.mark.parametrize("channels_first", [False, True])
def test_fused_batch_norm_relu_pool_equals_flax_batch_norm_then_relu_then_pool(channels_first):
    """Same outputs, gradients (input, scale, bias) and running statistics as the unfused layers,
    in train and eval mode, with negative scales (where the pool must take the window minimum);
    channels-first input (what an FFT layer hands over) gives the same channels-last output."""
    x = jax.random.normal(jax.random.key(3), (4, 10, 12, 6)) * 2.0 + 0.5
    scale = jnp.array([1.5, -0.7, 0.3, -2.0, 1.0, -0.05])  # at exactly 0 the scale gradient is a tie
    bias = jnp.array([0.1, 0.4, -0.2, 0.3, -1.0, 0.5])
    stats = {"mean": jnp.linspace(-0.3, 0.3, 6), "var": jnp.linspace(0.5, 2.0, 6)}
    fused, ref = cnn.BatchNormReluPool(channels_first=channels_first), _FlaxBatchNormReluPool()
    params = {"scale": scale, "bias": bias}

    def run(module, wrap, p, x, eval_mode):
        v = {"params": wrap(p), "batch_stats": wrap(stats)}
        if module is fused and channels_first:
            x = x.transpose(0, 3, 1, 2)
        out, upd = module.apply(v, x, eval_mode, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    unwrap = lambda v: v["bn"]  # noqa: E731
    for eval_mode in (False, True):
        out_f, st_f = run(fused, lambda d: d, params, x, eval_mode)
        out_r, st_r = run(ref, lambda d: {"bn": d}, params, x, eval_mode)
        if not eval_mode:
            train_stats = st_f
        np.testing.assert_allclose(np.asarray(out_f), np.asarray(out_r), rtol=1e-5, atol=1e-5)
        for key in ("mean", "var"):
            np.testing.assert_allclose(np.asarray(st_f[key]), np.asarray(unwrap(st_r)[key]), rtol=1e-5, atol=1e-6)
        r = jax.random.normal(jax.random.key(4), out_f.shape)
        loss_f = lambda p, x: jnp.sum(run(fused, lambda d: d, p, x, eval_mode)[0] * r)  # noqa: E731
        loss_r = lambda p, x: jnp.sum(run(ref, lambda d: {"bn": d}, p, x, eval_mode)[0] * r)  # noqa: E731
        (gp_f, gx_f), (gp_r, gx_r) = jax.grad(loss_f, (0, 1))(params, x), jax.grad(loss_r, (0, 1))(params, x)
        np.testing.assert_allclose(np.asarray(gx_f), np.asarray(gx_r), rtol=1e-4, atol=1e-5)
        for key in ("scale", "bias"):
            np.testing.assert_allclose(np.asarray(gp_f[key]), np.asarray(gp_r[key]), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(train_stats["mean"]), np.asarray(stats["mean"]))  # train mode updated them
    np.testing.assert_array_equal(np.asarray(st_f["mean"]), np.asarray(stats["mean"]))  # eval mode did not


def test_network_variables_keep_flax_batch_norm_names():
    """Checkpoints written before the fused block load unchanged: same variable tree."""
    model = cnn.build(cnn.architecture(TrainConfig(), 32), "direct")
    v = cnn.init_variables(jax.random.key(0), model, 32)
    assert sorted(v["batch_stats"]) == ["BatchNorm_0", "BatchNorm_1", "BatchNorm_2"]
    assert sorted(v["params"]["BatchNorm_1"]) == ["bias", "scale"]
    assert sorted(v["batch_stats"]["BatchNorm_2"]) == ["mean", "var"]


def test_jitted_init_equals_flax_eager_init():
    """`init_variables` compiles the init once; the values are Flax's own (same PRNG stream)."""
    model = cnn.build(cnn.architecture(TrainConfig(), 24), "direct")
    key = jax.random.key(7)
    eager = model.init({"params": key}, jnp.zeros((1, 24, 24, 1), jnp.float32), train=False)
    ours = cnn.init_variables(key, model, 24)
    for a, b in zip(jax.tree_util.tree_leaves(eager["params"]), jax.tree_util.tree_leaves(ours["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = cnn.init_variables(jax.random.key(8), model, 24)
    assert not np.array_equal(np.asarray(other["params"]["Conv_0"]["kernel"]), np.asarray(ours["params"]["Conv_0"]["kernel"]))


def _random_bn_net(key, model, box):
    """Variables with random batch-norm scales (some negative), means and variances."""
    v = cnn.init_variables(key, model, box)
    for i in range(len(model.conv_filters)):
        k = jax.random.fold_in(key, 100 + i)
        c = v["params"][f"BatchNorm_{i}"]["scale"].shape[0]
        v["params"][f"BatchNorm_{i}"]["scale"] = jax.random.normal(jax.random.fold_in(k, 0), (c,))
        v["params"][f"BatchNorm_{i}"]["bias"] = 0.3 * jax.random.normal(jax.random.fold_in(k, 1), (c,))
        v["batch_stats"][f"BatchNorm_{i}"]["mean"] = 0.1 * jax.random.normal(jax.random.fold_in(k, 2), (c,))
        v["batch_stats"][f"BatchNorm_{i}"]["var"] = jnp.exp(jax.random.normal(jax.random.fold_in(k, 3), (c,)))
    return v


@pytest.mark.parametrize("impl", ["direct", "fft", "s2d"])
def test_shared_first_block_and_tail_equal_each_nets_eval_forward(impl):
    """Predict's fast path: G nets' first layers as one convolution, batch norm folded, then each
    net's tail — the same logits as every net's own eval-mode forward."""
    box, g = 24, 3
    model = cnn.build(cnn.architecture(TrainConfig(), box), impl)
    nets = [_random_bn_net(jax.random.key(r), model, box) for r in range(g)]
    assert any(float(v["params"]["BatchNorm_0"]["scale"].min()) < 0 for v in nets)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, box, box)).astype(np.float32))
    folded = [inference.fold_batch_norm(v["params"], v["batch_stats"], 0) for v in nets]
    h = inference.shared_first_block(x, jnp.stack([f[0] for f in folded]), jnp.stack([f[1] for f in folded]), impl)
    assert h.shape == (g, 5, box // 2, box // 2, 16)
    for j, v in enumerate(nets):
        ref = model.apply(v, x[..., None], train=False)
        np.testing.assert_allclose(np.asarray(inference.tail_eval(model, v["params"], v["batch_stats"], h[j])), np.asarray(ref),
                                   rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_same_padding_matches_keras_convention_for_even_kernels():
    """'same' cross-correlation, extra zero row/column after the image (lo = (k-1)//2)."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(11, 11)).astype(np.float32), rng.normal(size=(4, 4)).astype(np.float32)
    full = correlate2d(np.pad(x, ((1, 2), (1, 2))), w, mode="valid")
    out = cnn.conv2d_direct(jnp.asarray(x)[None, :, :, None], jnp.asarray(w)[:, :, None, None])[0, :, :, 0]
    np.testing.assert_allclose(np.asarray(out), full, atol=1e-5)


def test_kernel_sizes_follow_paper_figure_1():
    assert cnn.kernel_sizes(128, (1 / 3, 1 / 10, 1 / 20)) == (42, 12, 6)
    assert cnn.kernel_sizes(120, (1 / 3, 1 / 10, 1 / 20)) == (40, 12, 6)
    assert cnn.kernel_sizes(32, (1 / 3, 1 / 10, 1 / 20)) == (10, 3, 3)  # minimum 3


def test_auto_uses_fft_for_large_kernels_and_s2d_for_the_first_layer_on_cpu():
    assert cnn.conv_impls_for((40, 12, 6), "auto", "cpu") == ("fft", "fft", "direct")
    assert cnn.conv_impls_for((21, 6, 3), "auto", "cpu") == ("fft", "direct", "direct")
    assert cnn.conv_impls_for((10, 3, 3), "auto", "cpu") == ("s2d", "direct", "direct")
    assert cnn.conv_impls_for((16, 4, 3), "auto", "cpu") == ("s2d", "direct", "direct")
    assert cnn.conv_impls_for((4, 3, 3), "auto", "cpu") == ("direct",) * 3
    # accelerators: every layer FFT once a kernel reaches 12 px (the grouped cuDNN convolution
    # that vmapped nets make was unusable at 120 px on an H100), else direct
    assert cnn.conv_impls_for((40, 12, 6), "auto", "gpu") == ("fft",) * 3
    assert cnn.conv_impls_for((21, 6, 3), "auto", "gpu") == ("fft",) * 3
    assert cnn.conv_impls_for((11, 3, 3), "auto", "gpu") == ("direct",) * 3
    assert cnn.conv_impls_for((10, 3, 3), "auto", "gpu") == ("direct",) * 3
    assert cnn.conv_impls_for((10, 3, 3), "s2d", "cpu") == ("s2d",) * 3


def test_paper_network_at_64px_has_expected_shapes_and_parameter_count():
    arch = cnn.architecture(TrainConfig(), 64)
    model = cnn.build(arch, "direct")
    variables = cnn.init_variables(jax.random.key(0), model, 64)
    logits = model.apply(variables, jnp.zeros((4, 64, 64, 1)), train=False)
    assert logits.shape == (4, 1)
    # conv 21²·16+16, BN 2·16, conv 6²·16·32+32, BN 2·32, conv 3²·32·64+64, BN 2·64,
    # dense (8·8·64)·256+256, dense 256+1
    expected = 7072 + 32 + 18464 + 64 + 18496 + 128 + 1048832 + 257
    assert cnn.param_count(variables["params"]) == expected
    fft_model = cnn.build(arch, "fft")
    x = jax.random.normal(jax.random.key(1), (3, 64, 64, 1))
    np.testing.assert_allclose(fft_model.apply(variables, x), model.apply(variables, x), rtol=1e-4, atol=1e-4)
    # train mode (batch statistics, the channels-first FFT hand-over) and the parameter gradients
    def train_out(m, params):
        out, upd = m.apply({**variables, "params": params}, x, train=True, rngs={"dropout": jax.random.key(2)},
                           mutable=["batch_stats"])
        return jnp.sum(out * jnp.arange(1.0, 4.0)[:, None]), upd["batch_stats"]
    # jitted: run op by op, the two backward passes made this test take ~31 s instead of ~14 s
    (l_fft, st_fft), g_fft = jax.jit(jax.value_and_grad(lambda p: train_out(fft_model, p), has_aux=True))(variables["params"])
    (l_dir, st_dir), g_dir = jax.jit(jax.value_and_grad(lambda p: train_out(model, p), has_aux=True))(variables["params"])
    np.testing.assert_allclose(float(l_fft), float(l_dir), rtol=1e-4)
    for tree_fft, tree_dir in ((st_fft, st_dir), (g_fft, g_dir)):
        leaves = list(zip(jax.tree_util.tree_leaves(tree_fft), jax.tree_util.tree_leaves(tree_dir)))
        # scale of the whole tree: the conv biases in front of a batch norm have an exact gradient
        # of 0, so theirs is float32 rounding noise in both models
        scale = max(float(np.max(np.abs(b))) for _, b in leaves)
        for a, b in leaves:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("axes", [(0, 2, 3), (0, 1, 2)])
def test_one_pass_sum_and_sum_of_squares_equals_two_reductions_with_gradients(axes):
    x = jax.random.normal(jax.random.key(0), (5, 3, 6, 4)) + 0.3
    w = jax.random.normal(jax.random.key(1), (2, x.shape[[i for i in range(4) if i not in axes][0]]))

    def loss(f, x):
        s, s2 = f(x)
        return jnp.sum(w[0] * s) + jnp.sum(w[1] * s2 ** 1.5)

    fast = jax.jit(lambda x: cnn.sum_and_sum_of_squares(x, axes))
    ref = lambda x: (x.sum(axes), (x * x).sum(axes))  # noqa: E731
    for a, b in zip(fast(x), ref(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(lambda x: loss(fast, x)))(x)),
                               np.asarray(jax.grad(lambda x: loss(ref, x))(x)), rtol=1e-4, atol=1e-5)
    t = jax.random.normal(jax.random.key(2), x.shape)
    for a, b in zip(jax.jvp(fast, (x,), (t,))[1], jax.jvp(ref, (x,), (t,))[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["direct", "fft"])
def test_conv_bias_before_batch_norm_is_not_trained_and_does_not_change_training(impl):
    """A per-channel shift in front of a training-mode batch norm cancels, so `Conv` stops its
    gradient: the bias gradient is exactly 0, and loss and every other gradient equal those of
    the same net with the biases at 0."""
    cfg = TrainConfig(conv_filters=(4, 8, 8), dense_units=16, dropout=0.0)
    model = cnn.build(cnn.architecture(cfg, 40), impl)
    variables = cnn.init_variables(jax.random.key(0), model, 40)
    x = jax.random.normal(jax.random.key(1), (6, 40, 40, 1))
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.5 if "bias" in jax.tree_util.keystr(path) and "Conv" in jax.tree_util.keystr(path) else v,
        variables["params"])
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 0 if "bias" in jax.tree_util.keystr(path) and "Conv" in jax.tree_util.keystr(path) else v,
        params)

    def loss(p):
        out, _ = model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out * jnp.arange(1.0, 7.0)[:, None])

    (l_b, g_b), (l_0, g_0) = jax.value_and_grad(loss)(params), jax.value_and_grad(loss)(zeroed)
    np.testing.assert_allclose(float(l_b), float(l_0), rtol=1e-4)  # E[x²] − E[x]² rounds differently after a shift
    for i in range(3):
        assert np.all(np.asarray(g_b[f"Conv_{i}"]["bias"]) == 0.0)
        assert float(np.abs(params[f"Conv_{i}"]["bias"]).min()) == 0.5  # the shift was really there
    for a, b in zip(jax.tree_util.tree_leaves(g_b), jax.tree_util.tree_leaves(g_0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


def _small():
    cfg = TrainConfig(conv_filters=(4, 8, 8), dense_units=16, dropout=0.0)
    model = cnn.build(cnn.architecture(cfg, 16), "direct")
    return model, cnn.init_variables(jax.random.key(0), model, 16)


def test_batch_norm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    model, variables = _small()
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 1)) * 3 + 1
    eval_all = model.apply(variables, x, train=False)
    eval_one = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(eval_all[:1], eval_one, rtol=1e-5, atol=1e-6)  # eval: per image
    train_all, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    train_half, _ = model.apply(variables, x[:4], train=True, mutable=["batch_stats"])
    assert not np.allclose(train_all[:4], train_half, atol=1e-4)  # train: depends on the batch
    mean0 = upd["batch_stats"]["BatchNorm_0"]["mean"]
    assert float(jnp.max(jnp.abs(mean0))) > 0  # running mean moved (momentum 0.9 → 10 % per step)


def test_rotation_by_90_degrees_equals_rot90():
    img = np.asarray(jax.random.normal(jax.random.key(0), (33, 33)))
    out = augment.rotate_shift(jnp.asarray(img)[None], jnp.array([90.0]), jnp.zeros((1, 2)))[0]
    np.testing.assert_allclose(np.asarray(out), np.rot90(img), atol=1e-4)


def test_integer_shift_translates_content():
    img = np.zeros((32, 32), np.float32)
    img[10:14, 12:15] = 1.0
    out = augment.rotate_shift(jnp.asarray(img)[None], jnp.array([0.0]), jnp.array([[3.0, -2.0]]))[0]
    np.testing.assert_allclose(np.asarray(out), np.roll(img, (3, -2), axis=(0, 1)), atol=1e-5)


def test_augmentation_preserves_norm_of_a_centred_particle_and_changes_it():
    n = 48
    yy, xx = np.mgrid[:n, :n] - n // 2
    blob = np.exp(-((yy - 4) ** 2 / 30 + xx**2 / 8)).astype(np.float32)  # elongated, off-centre
    imgs = jnp.asarray(np.repeat(blob[None], 16, axis=0))
    out = augment.augment(jax.random.key(3), imgs, max_shift_px=2.4)
    norms = np.linalg.norm(np.asarray(out).reshape(16, -1), axis=1)
    np.testing.assert_allclose(norms, np.linalg.norm(blob), rtol=0.03)
    assert np.min(np.linalg.norm(np.asarray(out - imgs).reshape(16, -1), axis=1)) > 0.1 * np.linalg.norm(blob)


@pytest.mark.parametrize("k,shape", [(16, (2, 24, 29, 1)), (7, (3, 13, 22, 2)), (5, (1, 9, 5, 1))])
def test_s2d_conv_equals_direct_on_rectangular_inputs(k, shape):
    """Widths that are not a multiple of the column group, a width below the kernel."""
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (k, k, shape[-1], 6)) / k
    direct, s2d = cnn.conv2d_direct(x, w), cnn.conv2d_s2d(x, w)
    assert s2d.shape == direct.shape
    assert float(jnp.max(jnp.abs(s2d - direct))) < 1e-5 * float(jnp.max(jnp.abs(direct)))


@pytest.mark.parametrize("cin,cout", [(1, 4), (3, 6), (2, 5)])  # paired first layer, paired real outputs, odd fallback
def test_fft_conv_inverse_by_forward_transform_equals_direct(cin, cout):
    """The accelerator form (inverse FFTs as forward FFTs of the conjugate, real outputs paired
    into complex planes): same values and gradients as the direct convolution, forced on CPU."""
    fft = partial(cnn.conv2d_fft, inverse_by_forward=True)
    kx, kw = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (2, 27, 27, cin))
    w = jax.random.normal(kw, (9, 9, cin, cout)) / 9
    direct, fast = cnn.conv2d_direct(x, w), fft(x, w)
    assert float(jnp.max(jnp.abs(fast - direct))) < 1e-5 * float(jnp.max(jnp.abs(direct)))
    for arg in (0, 1):
        g_direct = jax.grad(lambda x, w: jnp.sum(cnn.conv2d_direct(x, w) ** 2), argnums=arg)(x, w)
        g_fast = jax.grad(lambda x, w: jnp.sum(fft(x, w) ** 2), argnums=arg)(x, w)
        assert float(jnp.max(jnp.abs(g_fast - g_direct))) < 1e-4 * float(jnp.max(jnp.abs(g_direct)))


def test_hermitian_full_spectrum_matches_fft2():
    for ly, lx in [(8, 8), (7, 9), (9, 6)]:
        x = jax.random.normal(jax.random.key(ly * lx), (2, 3, ly, lx))
        full = cnn._hermitian_full(jnp.fft.rfft2(x, axes=(2, 3)), lx)
        np.testing.assert_allclose(np.asarray(full), np.asarray(jnp.fft.fft2(x, axes=(2, 3))), atol=1e-4)


def test_models_are_chosen_by_name_and_rebuilt_from_their_checkpoint_description():
    per_region = models.architecture(TrainConfig(), 32, 5)
    polar = models.architecture(TrainConfig(model="polar_trunk"), 32, 5)
    assert per_region["n_heads"] == 1 and "model" not in per_region  # the paper's checkpoints, unchanged
    assert polar["n_heads"] == 5 and polar["model"] == "polar_trunk"
    assert type(models.build(per_region)).__name__ == "RegionCNN" and type(models.build(polar)).__name__ == "PolarCNN"
    assert not models.get("per_region").one_net and models.get("polar_trunk").one_net
    with pytest.raises(ValueError, match="unknown model 'shared_trunk'"):
        models.get("shared_trunk")
