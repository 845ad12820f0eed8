"""The rotation-invariant polar trunk (beyond the paper; ``model: polar_trunk``).

A region label depends on the projection direction only, never on the in-plane rotation (psi):
the paper's nets learn that invariance from rotated copies, each region's net on its own. This
model builds it in and shares one network over all regions:

* **Polar sampling.** Each image is resampled (bilinear, zeros outside) on a polar grid centred
  on pixel (N//2, N//2): ``n_r = N // 2`` radii (r_i = (i + ½)·(N/2 − 1)/n_r) by
  ``n_theta = 4·⌈N/2⌉`` angles. An in-plane rotation of the image is a circular shift along θ.
* **Circular convolutions.** The paper's conv → batch norm → ReLU → 2×2 max-pool blocks
  (`cnn.Conv`, `cnn.BatchNormReluPool`) on the (r, θ) image, padded with zeros along r and
  wrapped along θ, so every block commutes with circular shifts along θ (by multiples of its
  stride).
* **Max over θ** after the last block: the features, and the logits, do not change when the
  polar image is shifted along θ by a multiple of 8 samples (the three pools' stride). For the
  image itself that is exact for quarter turns (the pixel grid maps onto itself; tested) and holds
  up to the bilinear interpolation for other angles.
  Then dropout, dense + ReLU and one sigmoid head per region, trained with the shared trunk's
  per-head balanced loss.
* **Augmentation in the sampling.** Training images are sampled at θ + a random offset and a
  random shift of the centre (`polar_augment`): the random rotation and shift of the paper's
  augmentation, with one interpolation instead of two.

Why: at 32 px it trains all 42 regions to the validation accuracy of the paper's Keras recipe
~26× sooner than that recipe, and on the demo it finds the true region among the top 3 for 0.99
of the particles against 0.59 for the paper's per-region nets (RESULTS.md, "Whole training job").
Functions are pure and JAX-traceable.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from ..errors import DeepAlignError
from . import augment, cnn

# Kernel widths as fractions of the box: 7, 3, 3 px at 32 px (the measured configuration), the
# paper's widths for layers 2 and 3 from 60 px on (12 and 6 px at 120 px), a smaller first kernel.
KERNEL_FRACTIONS = (0.22, 0.1, 0.05)


def grid_shape(box_px: int) -> tuple[int, int]:
    """(n_r, n_theta) of the polar grid for a box of `box_px`: (N // 2, 4·⌈N/2⌉)."""
    return box_px // 2, 4 * math.ceil(box_px / 2)


def _grid(box_px: int) -> tuple[np.ndarray, np.ndarray]:
    n_r, n_theta = grid_shape(box_px)
    radii = (np.arange(n_r) + 0.5) * (box_px / 2 - 1) / n_r
    thetas = 2 * np.pi * np.arange(n_theta) / n_theta
    return radii.astype(np.float32), thetas.astype(np.float32)


def to_polar(images: jax.Array, angles_rad: jax.Array | None = None, shifts_px: jax.Array | None = None) -> jax.Array:
    """Bilinear polar resampling (zeros outside the box).

    images: (B, N, N).  angles_rad: (B,) offsets added to θ: the result is that of the image
    turned by +a (`augment.rotate_shift`'s sense, np.rot90's for a quarter turn), i.e. the θ axis
    shifted by a; shifts_px: (B, 2) (dy, dx) offsets of the centre.
    Returns (B, n_r, n_theta) float32: out[b, i, j] = image[b] at
    (c + dy + r_i·sin(θ_j + a), c + dx + r_i·cos(θ_j + a)), c = N//2 (row, column)."""
    b, n = images.shape[0], images.shape[-1]
    radii, thetas = _grid(n)
    a = jnp.zeros((b,), jnp.float32) if angles_rad is None else angles_rad
    s = jnp.zeros((b, 2), jnp.float32) if shifts_px is None else shifts_px
    c = n // 2

    def one(img, a, s):
        t = thetas[None, :] + a
        y = c + s[0] + radii[:, None] * jnp.sin(t)
        x = c + s[1] + radii[:, None] * jnp.cos(t)
        return map_coordinates(img, [y, x], order=1, mode="constant", cval=0.0)

    return jax.vmap(one)(images.astype(jnp.float32), a, s)


def polar_augment(key: jax.Array, images: jax.Array, max_shift_px: float) -> jax.Array:
    """`to_polar` at the paper augmentation's random rotation and shift
    (`augment.random_rotations_shifts`), sampled once. (B, N, N) → (B, n_r, n_theta)."""
    angles_deg, shifts = augment.random_rotations_shifts(key, images.shape[0], max_shift_px)
    return to_polar(images, jnp.deg2rad(angles_deg), shifts)


def circular_conv(conv: nn.Module, x: jax.Array, k: int) -> jax.Array:
    """A 'same' k×k convolution module applied with the θ axis (axis 2) wrapped: the input is
    extended by its own columns on both sides, the zero-padded columns of the result cut off.
    x: (B, n_r, n_theta, C)."""
    w = x.shape[2]
    lo, hi = (k - 1) // 2, k - 1 - (k - 1) // 2
    xp = jnp.concatenate([x[:, :, w - lo :], x, x[:, :, :hi]], axis=2) if k > 1 else x
    return conv(xp)[:, :, lo : lo + w]


class PolarCNN(nn.Module):
    """`__call__(x, train) -> (B, n_heads)` logits. x: (B, N, N, 1) images (sampled on the polar
    grid inside) or (B, n_r, n_theta, 1) images already sampled (`polar_augment`, training).
    Dropout needs an rng named "dropout" when train."""

    box_px: int
    conv_filters: tuple[int, ...] = (16, 32, 64)
    kernels: tuple[int, ...] = (7, 3, 3)
    conv_impls: tuple[str, ...] = ("direct", "direct", "direct")
    dense_units: int = 256
    dropout: float = 0.2
    n_heads: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.shape[1:3] != grid_shape(self.box_px):
            x = to_polar(x[..., 0])[..., None]
        for i, (filters, k, impl) in enumerate(zip(self.conv_filters, self.kernels, self.conv_impls)):
            y = circular_conv(cnn.Conv(filters, k, impl, bias_before_norm=True), x, k)
            x = cnn.BatchNormReluPool(name=f"BatchNorm_{i}")(y, use_running_average=not train)
        x = x.max(axis=2).reshape((x.shape[0], -1))  # invariance: the maximum over θ
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.dense_units, kernel_init=nn.initializers.glorot_uniform())(x))
        return nn.Dense(self.n_heads, kernel_init=nn.initializers.glorot_uniform())(x)


def architecture(cfg: Any, box_px: int, n_heads: int) -> dict:
    """Plain-data description stored in checkpoints (``arch["model"] == "polar_trunk"``)."""
    n_r = grid_shape(box_px)[0]
    if n_r < 8:
        raise DeepAlignError(f"polar_trunk needs a working box of at least 16 px (got {box_px} px): three 2×2 pools of {n_r} radii")
    return {**cnn.architecture(cfg, box_px, n_heads), "model": "polar_trunk",
            "kernels": list(cnn.kernel_sizes(box_px, KERNEL_FRACTIONS))}


def build(arch: dict, conv_impl: str = "auto", backend: str | None = None) -> PolarCNN:
    kernels = tuple(int(k) for k in arch["kernels"])
    return PolarCNN(
        box_px=int(arch["box_px"]),
        conv_filters=tuple(int(f) for f in arch["conv_filters"]),
        kernels=kernels,
        conv_impls=cnn.conv_impls_for(kernels, conv_impl, backend),
        dense_units=int(arch["dense_units"]),
        dropout=float(arch["dropout"]),
        n_heads=int(arch["n_heads"]),
    )
