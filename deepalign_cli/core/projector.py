"""Fourier-slice projector and Fourier-space image shifts (JAX), in RELION's conventions.

Convention (see ``geometry``): for a pose matrix ``A`` (map → image) the projection is

    P[y, x] = Σ_z V(Aᵀ · (x, y, z))      V indexed vol[z, y, x], coordinates from index N//2,

so by the Fourier-slice theorem ``P̂(kx, ky) = V̂(Aᵀ · (kx, ky, 0))``.

Why Fourier slice and not a real-space line integral: a real-space projector costs O(N³) per
image (every voxel is touched), the Fourier-slice projector O(N²) per image after a one-off
O((pN)³ log pN) FFT of the padded map; at N = 64 that is ~64× fewer interpolations, and the image
FT comes for free (the CTF and the shifts are applied there anyway). This is also what RELION's
``relion_project`` does (padding 2, trilinear interpolation, gridding correction), so the output
matches the RELION oracle to NCC ≥ 0.999 (docs/design_imaging.md).

Method: the map is zero-padded ``pad``× (default 2) about its centre, divided by the trilinear
gridding kernel (sinc² per axis, the real-space transform of the interpolation kernel), and its
centred 3D FT stored once (:func:`prepare_volume`). Each image FT samples that array by trilinear
interpolation at ``pad · Aᵀ k``; frequencies with |k| > N/2 (beyond Nyquist, RELION's r_max) are
zero.

Layout: every Fourier array returned here is UNSHIFTED numpy-FFT order (DC at [0, 0]) and is the FT
of an image whose centre sits at index N//2, so ``real(ifft2(F))`` is the image. Intensity scale: the
line integral with unit voxel step (``Σ_z vol``), before any gridding loss.

Shifts are (x, y) pairs in pixels. ``project_ft(..., shifts_px=origin_px)`` returns the RELION
particle image (the centred projection translated by **−origin**); ``shift_images(img, +origin)``
re-centres it.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@partial(jax.tree_util.register_dataclass, data_fields=["ft_centred"], meta_fields=["box", "pad"])
@dataclasses.dataclass(frozen=True)
class VolumeFT:
    """Prepared map for the Fourier-slice projector (a JAX pytree; ``box`` and ``pad`` are static).

    ft_centred: (pad·N, pad·N, pad·N) complex64, centred 3D FT (DC at index pad·N//2) of the
        zero-padded, gridding-corrected map, axes (kz, ky, kx).
    box: N, the edge of the original map and of the projections, in pixels.
    pad: padding factor.
    """

    ft_centred: jax.Array
    box: int
    pad: int


def _sinc(x):
    return jnp.sinc(x)  # sin(πx)/(πx)


@partial(jax.jit, static_argnames=("pad", "gridding"))
def prepare_volume(vol, pad: int = 2, gridding: bool = True) -> VolumeFT:
    """Pad and Fourier-transform a map for :func:`project_ft`.

    vol: (N, N, N) float, indexed vol[z, y, x], centre at index N//2.
    pad: zero-padding factor (2 as RELION; larger is more accurate and slower).
    gridding: divide by the trilinear kernel's real-space transform (sinc² per axis) first.
    Returns a :class:`VolumeFT` holding the (pad·N)³ complex64 centred FT.
    """
    vol = jnp.asarray(vol, jnp.float32)
    n = vol.shape[0]
    m = pad * n
    start = m // 2 - n // 2
    padded = jnp.zeros((m, m, m), jnp.float32).at[start : start + n, start : start + n, start : start + n].set(vol)
    if gridding:
        r = (jnp.arange(m) - m // 2) / m
        g = _sinc(r) ** 2
        padded = padded / (g[:, None, None] * g[None, :, None] * g[None, None, :])
    ft = jnp.fft.fftshift(jnp.fft.fftn(jnp.fft.ifftshift(padded)))
    return VolumeFT(ft.astype(jnp.complex64), n, pad)


def freq_index_grid(box: int):
    """Integer image frequencies in unshifted FFT order. Returns (ky, kx), each (N, N) float32,
    in cycles per box (k / N cycles per pixel)."""
    k = np.fft.fftfreq(box) * box
    ky, kx = np.meshgrid(k, k, indexing="ij")
    return jnp.asarray(ky, jnp.float32), jnp.asarray(kx, jnp.float32)


def _trilinear(ft_flat, m: int, coords):
    """Trilinear interpolation of a flattened (m, m, m) complex array.

    coords: (..., 3) float index coordinates (z, y, x). Corners outside the array count as 0.
    """
    c0 = jnp.floor(coords)
    f = coords - c0
    i0 = c0.astype(jnp.int32)
    out = jnp.zeros(coords.shape[:-1], ft_flat.dtype)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx = i0 + jnp.array([dz, dy, dx], jnp.int32)
                w = (
                    (f[..., 0] if dz else 1 - f[..., 0])
                    * (f[..., 1] if dy else 1 - f[..., 1])
                    * (f[..., 2] if dx else 1 - f[..., 2])
                )
                valid = jnp.all((idx >= 0) & (idx < m), axis=-1)
                idx = jnp.clip(idx, 0, m - 1)
                flat = (idx[..., 0] * m + idx[..., 1]) * m + idx[..., 2]
                out = out + jnp.where(valid, w, 0.0) * ft_flat[flat]
    return out


def sample_slices(vol_ft: VolumeFT, rotmats, kx, ky):
    """Central-slice samples of a prepared map at arbitrary image frequencies: ``V̂(Aᵀ (kx, ky, 0))``
    for every pose, by the same trilinear interpolation as :func:`project_ft` (corners outside the
    padded array count as 0), without the image-centre phase, the Nyquist mask or the box scaling.

    vol_ft: :func:`prepare_volume` output.  rotmats: (n, 3, 3) poses.  kx, ky: (K,) float frequencies
    in cycles per box (signed, as ``np.fft.fftfreq · N``). Returns (n, K) complex64.

    Faster than gathering from :func:`project_ft` when K < N² (e.g. a band-limited score), and faster
    per sample than ``_trilinear``: the 8 corners are one gather at constant flat offsets, and the
    out-of-range corners are zeroed through per-axis weights instead of per-corner index tests.
    """
    m = vol_ft.box * vol_ft.pad
    rot = jnp.asarray(rotmats, jnp.float32)
    kx = jnp.asarray(kx, jnp.float32)
    ky = jnp.asarray(ky, jnp.float32)
    q = kx[None, :, None] * rot[:, None, 0, :] + ky[None, :, None] * rot[:, None, 1, :]  # (n, K, xyz)
    coords = m // 2 + vol_ft.pad * q[..., ::-1]  # (z, y, x) index order of ft_centred
    c0 = jnp.floor(coords)
    f = coords - c0
    i0 = c0.astype(jnp.int32)
    inside0 = (i0 >= 0) & (i0 < m)
    inside1 = (i0 >= -1) & (i0 < m - 1)
    w = jnp.stack([jnp.where(inside0, 1 - f, 0.0), jnp.where(inside1, f, 0.0)], axis=-1)  # (n, K, 3, 2)
    w8 = (w[..., 0, :, None, None] * w[..., 1, None, :, None] * w[..., 2, None, None, :]).reshape(*i0.shape[:-1], 8)
    flat = (i0[..., 0] * m + i0[..., 1]) * m + i0[..., 2]
    offsets = jnp.array([(dz * m + dy) * m + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)], jnp.int32)
    corners = vol_ft.ft_centred.reshape(-1)[jnp.clip(flat[..., None] + offsets, 0, m**3 - 1)]  # (n, K, 8)
    return jnp.sum(corners * w8, axis=-1).astype(jnp.complex64)


def _shift_phase(box: int, shifts_px):
    """exp(-2πi (kx sx + ky sy)/N): (n, N, N) complex64 phase translating content by +shift."""
    ky, kx = freq_index_grid(box)
    s = jnp.asarray(shifts_px, jnp.float32)
    arg = kx[None] * s[:, 0, None, None] + ky[None] * s[:, 1, None, None]
    return jnp.exp((-2j * jnp.pi / box) * arg).astype(jnp.complex64)


@partial(jax.jit, static_argnames="out_box")
def project_ft(vol_ft: VolumeFT, rotmats, shifts_px=None, out_box: int | None = None):
    """Fourier transforms of the projections of a prepared map.

    vol_ft: from :func:`prepare_volume` (box N).
    rotmats: (n, 3, 3) pose matrices A (map → image), RELION ``Euler_angles2matrix``.
    shifts_px: (n, 2) RELION origins (OriginX, OriginY) in output pixels, or None. The content is
        translated by −origin, as in a RELION particle image.
    out_box: M ≤ N (static) to project straight into a smaller box by keeping the M lowest
        frequencies (= Fourier cropping, pixel size × N/M, values scaled by (M/N)² so the mean pixel
        is preserved); default N.
    Returns (n, M, M) complex64 image FTs, unshifted layout, image centre at index M//2.
    """
    n_box, pad = vol_ft.box, vol_ft.pad
    n_out = n_box if out_box is None else int(out_box)
    m = n_box * pad
    rot = jnp.asarray(rotmats, jnp.float32)
    ky, kx = freq_index_grid(n_out)  # same physical frequencies as in the N box (k / (N·pixel))
    # q = Aᵀ (kx, ky, 0) = kx·A[0, :] + ky·A[1, :], components (x, y, z) in cycles per N box
    q = kx[None, ..., None] * rot[:, None, None, 0, :] + ky[None, ..., None] * rot[:, None, None, 1, :]
    coords = m // 2 + pad * q[..., ::-1]  # (z, y, x) index order of ft_centred
    vals = _trilinear(vol_ft.ft_centred.reshape(-1), m, coords)
    inside = (kx**2 + ky**2) <= (n_out / 2) ** 2
    vals = jnp.where(inside[None], vals, 0.0) * (n_out / n_box) ** 2
    # centre the image at M//2, then translate by -origin: one phase with shift M//2 - origin
    centre = jnp.full((rot.shape[0], 2), float(n_out // 2), jnp.float32)
    total = centre if shifts_px is None else centre - jnp.asarray(shifts_px, jnp.float32)
    return (vals * _shift_phase(n_out, total)).astype(jnp.complex64)


@partial(jax.jit, static_argnames="out_box")
def project(vol_ft: VolumeFT, rotmats, shifts_px=None, out_box: int | None = None):
    """Real-space projections: ``real(ifft2(project_ft(vol_ft, rotmats, shifts_px, out_box)))``.

    Returns (n, M, M) float32 images (M = out_box or N), rows y, columns x, centre at index M//2.
    """
    ft = project_ft(vol_ft, rotmats, shifts_px, out_box)
    return jnp.real(jnp.fft.ifft2(ft)).astype(jnp.float32)


@jax.jit
def shift_images_ft(images_ft, shifts_px):
    """Translate image content by +shift in Fourier space.

    images_ft: (n, N, N) complex, unshifted layout.  shifts_px: (n, 2) (x, y) in pixels.
    Returns (n, N, N) complex64.
    """
    box = images_ft.shape[-1]
    return (images_ft * _shift_phase(box, shifts_px)).astype(jnp.complex64)


@jax.jit
def shift_images(images, shifts_px):
    """Translate (n, N, N) real images by +shift (x, y) pixels (periodic, sub-pixel by phase).

    ``shift_images(particle, +origin_px)`` re-centres a RELION particle image.
    Returns (n, N, N) float32.
    """
    f = jnp.fft.fft2(jnp.asarray(images, jnp.float32))
    return jnp.real(jnp.fft.ifft2(shift_images_ft(f, shifts_px))).astype(jnp.float32)
