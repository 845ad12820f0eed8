"""On-device training augmentation: uniform random in-plane rotation and random shift.

One bilinear resampling (``jax.scipy.ndimage.map_coordinates``, order 1, zeros outside) applies
both, so an image is interpolated once. Convention: the centre of rotation is pixel (N//2, N//2)
(project convention); a positive angle turns the image the way ``np.rot90`` does (counter-clockwise
as displayed with row 0 at the top), so ``rotate_shift(img, 90°, 0) == np.rot90(img)`` for odd N;
a shift (dy, dx) px moves the content towards +y, +x after the rotation.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates


def rotate_shift(images: jax.Array, angles_deg: jax.Array, shifts_px: jax.Array) -> jax.Array:
    """Rotate then translate each image (bilinear, zeros outside).

    images: (B, N, N) float32.  angles_deg: (B,) degrees.  shifts_px: (B, 2) (dy, dx) px.
    Returns (B, N, N) float32: out(p) = in(R(−θ) · (p − c − s) + c), c = N//2."""
    n = images.shape[-1]
    c = n // 2
    grid = jnp.arange(n, dtype=jnp.float32) - c
    gy, gx = jnp.meshgrid(grid, grid, indexing="ij")

    def one(img, angle_deg, shift):
        t = jnp.deg2rad(angle_deg)
        cos, sin = jnp.cos(t), jnp.sin(t)
        dy, dx = gy - shift[0], gx - shift[1]
        src_y = cos * dy + sin * dx + c
        src_x = -sin * dy + cos * dx + c
        return map_coordinates(img, [src_y, src_x], order=1, mode="constant", cval=0.0)

    return jax.vmap(one)(images, angles_deg, shifts_px)


def random_rotations_shifts(key: jax.Array, n: int, max_shift_px: float) -> tuple[jax.Array, jax.Array]:
    """The augmentation's draw: (n,) angles uniform in [0, 360)° and (n, 2) shifts uniform in
    [−max, max] px per axis."""
    k_rot, k_shift = jax.random.split(key)
    angles = jax.random.uniform(k_rot, (n,), minval=0.0, maxval=360.0)
    shifts = jax.random.uniform(k_shift, (n, 2), minval=-max_shift_px, maxval=max_shift_px)
    return angles, shifts


@partial(jax.jit, static_argnames=("max_shift_px",))
def augment(key: jax.Array, images: jax.Array, max_shift_px: float) -> jax.Array:
    """Uniform random rotation in [0, 360)° and uniform random shift in [−max, max] px per axis
    (`random_rotations_shifts`). images: (B, N, N) float32.  Returns (B, N, N) float32."""
    return rotate_shift(images, *random_rotations_shifts(key, images.shape[0], max_shift_px))
