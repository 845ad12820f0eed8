"""The paper's per-region CNN (Jiménez-Moreno et al. 2021, Fig. 1) in Flax linen, with an FFT
convolution path for its large kernels.

Network for an (N, N, 1) image (paper defaults, every knob in `TrainConfig`):

    conv 16 × k1 → norm → ReLU → maxpool 2×2      k1 = max(3, floor(N / 3))   (40 at 120 px)
    conv 32 × k2 → norm → ReLU → maxpool 2×2      k2 = max(3, floor(N / 10))  (12 at 120 px)
    conv 64 × k3 → norm → ReLU → maxpool 2×2      k3 = max(3, floor(N / 20))  (6 at 120 px)
    dropout 0.2 → flatten → dense 256 ReLU → dense n_heads   (logits; sigmoid outside)

Choices the paper leaves open, made here:

* **Kernel size = floor(fraction · N), at least 3.** Floor reproduces the paper's Fig. 1 exactly
  (128 px → 42, 12, 6; rounding would give 43, 13, 6). The minimum of 3 keeps every conv spatial
  at small boxes (32 px → 10, 3, 3) instead of degenerating into a 1×1 channel mix.
* **'same' padding, stride 1** (Keras' ``padding="same"``: for an even kernel the extra zero row
  goes after, lo = (k − 1) // 2), so the pools halve the box exactly: 120 → 60 → 30 → 15 and the
  dense layer sees (N // 8)² · 64 features. 'valid' padding with a kernel of N/3 would throw away
  a third of the box in the first layer.
* **ReLU after the normalisation** (the paper names no activation; without one the conv part would
  be linear between pools).
* **Normalisation** (``norm``): ``"batch"`` (default, the paper's Keras BatchNormalization) with
  momentum ``BATCH_NORM_MOMENTUM = 0.9`` instead of Keras' 0.99: a run is a few hundred steps per
  region and early stopping reads the validation loss after the first epoch, so the running
  statistics must forget their initial (0, 1) within ~10 steps, not ~100. Eval mode uses the
  running statistics (each image's output independent of its batch); train mode the batch's.
  ``"group"`` (GroupNorm, ``GROUP_NORM_GROUPS`` groups) and ``"layer"`` behave the same in train and
  eval and carry no state — useful when batches are tiny.
* **Glorot-uniform kernels and zero biases**, as Keras, so the reference benchmark starts alike.

Linen rather than nnx: a model is a stateless description and its variables a plain pytree, so a
region's variables can be stacked and ``jax.vmap``-ed over regions, scanned over steps and
serialised with ``flax.serialization`` without object surgery.

Convolutions: ``conv2d_direct`` (``lax.conv_general_dilated``) and ``conv2d_fft`` (zero-padded
real FFTs, the product summed over input channels per frequency) compute the same 'same'
cross-correlation; ``conv_impls_for`` picks per layer (see ``FFT_MIN_KERNEL_CPU``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-3  # Keras' default, so the reference network normalises alike
GROUP_NORM_GROUPS = 8
MIN_KERNEL_PX = 3
POOL_PX = 2
# `conv_impl="auto"` on CPU: FFT for every layer whose kernel is at least this wide. Measured
# (training step, batch 128, XLA:CPU, 2 shared cores, image-steps/s direct/direct/direct →
# fft/direct/direct → fft/fft/direct → fft/fft/fft): 64 px (kernels 21, 6, 3): 206 → 333 → 318 →
# 264; 120 px (kernels 40, 12, 6): 20 → 37 → 52 → 49. FFT pays from kernel ~10 upwards; for the
# small last kernels the FFT's fixed cost (Cin + Cout transforms) is larger than the direct MACs.
# "patches" (im2col + one GEMM, `conv2d_patches`) was measured slower on the same machine
# (2026-11-25, idle, image-steps/s): 64 px fft/direct/direct 355 vs fft/patches/direct 238 and
# fft/patches/patches 209; 120 px fft/fft/direct 64 vs fft/patches/direct 17 and fft/fft/patches
# 69 (equal within noise): the patch tensor (k² × the activations) costs more memory traffic than
# XLA's convolution loses, so "auto" never picks it; it stays selectable (`conv_impl: patches`).
# Re-measure with `benchmarks/train_predict.py --conv-sweep`.
FFT_MIN_KERNEL_CPU = 8
# On GPU the cuDNN direct convolution wins for all of the paper's kernels at these box sizes.
FFT_MIN_KERNEL_ACCEL = 10**9
_FFT_PRIMES = (2, 3, 5, 7)


def kernel_sizes(box_px: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """Conv kernel widths (px) for a box of `box_px`: max(MIN_KERNEL_PX, floor(f · box))."""
    return tuple(max(MIN_KERNEL_PX, int(np.floor(f * box_px + 1e-9))) for f in fractions)


def conv_impls_for(kernels: Sequence[int], conv_impl: str, backend: str | None = None) -> tuple[str, ...]:
    """Per-layer convolution implementation: "direct" or "fft".

    conv_impl: "direct", "fft" or "auto" (FFT for kernels ≥ the backend's measured threshold).
    backend: jax backend name; default `jax.default_backend()`.
    """
    if conv_impl in _CONVS:
        return tuple(conv_impl for _ in kernels)
    backend = backend or jax.default_backend()
    threshold = FFT_MIN_KERNEL_CPU if backend == "cpu" else FFT_MIN_KERNEL_ACCEL
    return tuple("fft" if k >= threshold else "direct" for k in kernels)


def _same_pads(k: int) -> tuple[int, int]:
    lo = (k - 1) // 2
    return lo, k - 1 - lo


def _fft_len(n: int) -> int:
    """Smallest length ≥ n whose prime factors are all in _FFT_PRIMES."""
    while True:
        m = n
        for p in _FFT_PRIMES:
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def conv2d_direct(x: jax.Array, w: jax.Array) -> jax.Array:
    """'same' cross-correlation (what Keras/Flax call convolution), stride 1.

    x: (B, H, W, Cin) float32.  w: (kh, kw, Cin, Cout) float32.  Returns (B, H, W, Cout)."""
    pads = [_same_pads(w.shape[0]), _same_pads(w.shape[1])]
    return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv2d_fft(x: jax.Array, w: jax.Array) -> jax.Array:
    """Same result as `conv2d_direct` (to float32 rounding, ~1e-6 relative) through real FFTs.

    The circular correlation of length L equals the linear one on the H output rows when
    L ≥ H + hi, hi = k − 1 − (k − 1)//2 (no wrap-around reaches them); L is rounded up to a
    7-smooth length. Cost per image: FFTs of Cin inputs and Cout outputs plus L·(L/2+1)·Cin·Cout
    complex MACs, instead of H·W·k²·Cin·Cout — independent of k.

    x: (B, H, W, Cin) float32.  w: (kh, kw, Cin, Cout) float32.  Returns (B, H, W, Cout) float32."""
    _, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    (_, hi_y), (_, hi_x) = _same_pads(kh), _same_pads(kw)
    ly, lx = _fft_len(h + hi_y), _fft_len(wd + hi_x)
    xf = jnp.fft.rfft2(x, s=(ly, lx), axes=(1, 2))
    wf = jnp.fft.rfft2(w[::-1, ::-1], s=(ly, lx), axes=(0, 1))
    if x.shape[-1] == 1:
        yf = xf * wf[..., 0, :]
    else:
        yf = jnp.einsum("byxc,yxcd->byxd", xf, wf)
    y = jnp.fft.irfft2(yf, s=(ly, lx), axes=(1, 2))
    oy, ox = kh - 1 - (kh - 1) // 2, kw - 1 - (kw - 1) // 2
    return y[:, oy : oy + h, ox : ox + wd, :]


def conv2d_patches(x: jax.Array, w: jax.Array) -> jax.Array:
    """Same result as `conv2d_direct` as one matrix product (im2col): the kh·kw shifted views of
    the zero-padded input are concatenated along channels, (B·H·W, kh·kw·Cin) @ (kh·kw·Cin, Cout).

    XLA:CPU runs large GEMMs near the machine's peak but its convolutions (and their gradients)
    far below it; the price is a patch tensor kh·kw times the input (kept for the backward pass).
    x: (B, H, W, Cin) float32.  w: (kh, kw, Cin, Cout) float32.  Returns (B, H, W, Cout) float32."""
    kh, kw, cin, cout = w.shape
    _, h, wd, _ = x.shape
    (ly, hy), (lx, hx) = _same_pads(kh), _same_pads(kw)
    xp = jnp.pad(x, ((0, 0), (ly, hy), (lx, hx), (0, 0)))
    cols = jnp.concatenate([xp[:, i : i + h, j : j + wd, :] for i in range(kh) for j in range(kw)], axis=-1)
    return cols @ w.reshape(kh * kw * cin, cout)


_CONVS = {"direct": conv2d_direct, "fft": conv2d_fft, "patches": conv2d_patches}


class Conv(nn.Module):
    """'same' conv layer with a selectable implementation (direct, FFT or patches), Glorot kernel
    + bias."""

    features: int
    kernel_px: int
    impl: str = "direct"

    @nn.compact
    def __call__(self, x):
        w = self.param(
            "kernel", nn.initializers.glorot_uniform(), (self.kernel_px, self.kernel_px, x.shape[-1], self.features)
        )
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return _CONVS[self.impl](x, w) + b


class RegionCNN(nn.Module):
    """The paper's network. `__call__(x (B, N, N, 1), train) -> (B, n_heads)` logits.

    n_heads = 1 is the paper's per-region binary classifier; n_heads = R is the shared-trunk model
    (one trunk, one sigmoid head per region). Dropout needs an rng named "dropout" when train."""

    conv_filters: tuple[int, ...] = (16, 32, 64)
    kernels: tuple[int, ...] = (21, 6, 3)
    conv_impls: tuple[str, ...] = ("direct", "direct", "direct")
    dense_units: int = 256
    dropout: float = 0.2
    norm: str = "batch"
    n_heads: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        for filters, k, impl in zip(self.conv_filters, self.kernels, self.conv_impls):
            x = Conv(filters, k, impl)(x)
            if self.norm == "batch":
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON
                )(x)
            elif self.norm == "group":
                x = nn.GroupNorm(num_groups=min(GROUP_NORM_GROUPS, filters))(x)
            else:
                x = nn.LayerNorm(reduction_axes=(-3, -2, -1))(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (POOL_PX, POOL_PX), strides=(POOL_PX, POOL_PX), padding="VALID")
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense_units, kernel_init=nn.initializers.glorot_uniform())(x))
        return nn.Dense(self.n_heads, kernel_init=nn.initializers.glorot_uniform())(x)


def architecture(cfg: Any, box_px: int, n_heads: int = 1) -> dict:
    """Plain-data description of the network (stored in every checkpoint).

    cfg: a TrainConfig (conv_filters, kernel_fractions, dense_units, dropout, norm)."""
    return {
        "box_px": int(box_px),
        "conv_filters": [int(f) for f in cfg.conv_filters],
        "kernels": list(kernel_sizes(box_px, cfg.kernel_fractions)),
        "dense_units": int(cfg.dense_units),
        "dropout": float(cfg.dropout),
        "norm": str(cfg.norm),
        "n_heads": int(n_heads),
    }


def build_model(arch: dict, conv_impl: str = "auto", backend: str | None = None) -> RegionCNN:
    """RegionCNN from an `architecture` dict; conv_impl "auto" | "direct" | "fft"."""
    kernels = tuple(int(k) for k in arch["kernels"])
    return RegionCNN(
        conv_filters=tuple(int(f) for f in arch["conv_filters"]),
        kernels=kernels,
        conv_impls=conv_impls_for(kernels, conv_impl, backend),
        dense_units=int(arch["dense_units"]),
        dropout=float(arch["dropout"]),
        norm=str(arch["norm"]),
        n_heads=int(arch["n_heads"]),
    )


def init_variables(key: jax.Array, model: RegionCNN, box_px: int) -> dict:
    """{"params": …, "batch_stats": … (empty for group/layer norm)} for an (N, N, 1) input."""
    variables = model.init({"params": key}, jnp.zeros((1, box_px, box_px, 1), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def param_count(params) -> int:
    """Number of trainable scalars in a params pytree."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
