"""Image and map preprocessing: Fourier cropping, background normalisation, low-pass, noise, CTF.

All functions take and return arrays with explicit shapes; images are (n, N, N) with rows y and
columns x, maps (N, N, N) indexed [z, y, x], centres at index N//2. Fourier arrays are unshifted
numpy-FFT layout. No file I/O, no global RNG.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

PAPER_PIXEL_PER_RESOLUTION = 3.0  # the paper works at a pixel size of (target resolution) / 3


def _crop_centred_ft(ft_centred, new_box: int, axes):
    """Keep the central new_box frequencies along each axis of a centred FT; the Nyquist plane of
    an even new_box is zeroed (its ± partner was cut away, so it cannot stay Hermitian)."""
    n = ft_centred.shape[axes[0]]
    start = n // 2 - new_box // 2
    idx = [slice(None)] * ft_centred.ndim
    for a in axes:
        idx[a] = slice(start, start + new_box)
    out = ft_centred[tuple(idx)]
    if new_box % 2 == 0 and new_box < n:
        for a in axes:
            sel = [slice(None)] * out.ndim
            sel[a] = 0
            out = out.at[tuple(sel)].set(0)
    return out


@partial(jax.jit, static_argnames="new_box")
def fourier_crop(images, new_box: int):
    """Downsample (n, N, N) images to (n, M, M) by cropping their Fourier transform (M ≤ N).

    The pixel size grows by N/M. Values are rescaled so that the mean (DC) is preserved.
    Returns (n, M, M) float32.
    """
    images = jnp.asarray(images, jnp.float32)
    n_box = images.shape[-1]
    ft = jnp.fft.fftshift(jnp.fft.fft2(jnp.fft.ifftshift(images, axes=(-2, -1))), axes=(-2, -1))
    ft = _crop_centred_ft(ft, new_box, (-2, -1))
    out = jnp.fft.fftshift(jnp.fft.ifft2(jnp.fft.ifftshift(ft, axes=(-2, -1))), axes=(-2, -1))
    return (jnp.real(out) * (new_box / n_box) ** 2).astype(jnp.float32)


@partial(jax.jit, static_argnames="new_box")
def fourier_crop_volume(vol, new_box: int):
    """Downsample an (N, N, N) map to (M, M, M) by Fourier cropping; the mean is preserved.
    Returns (M, M, M) float32."""
    vol = jnp.asarray(vol, jnp.float32)
    n_box = vol.shape[-1]
    ft = jnp.fft.fftshift(jnp.fft.fftn(jnp.fft.ifftshift(vol)))
    ft = _crop_centred_ft(ft, new_box, (0, 1, 2))
    out = jnp.fft.fftshift(jnp.fft.ifftn(jnp.fft.ifftshift(ft)))
    return (jnp.real(out) * (new_box / n_box) ** 3).astype(jnp.float32)


def centre_crop_or_pad_volume(vol, box: int):
    """Crop or zero-pad a map (n, n, n) to (box, box, box), keeping the centre voxel n//2 at box//2.
    Returns numpy float32."""
    vol = np.asarray(vol, np.float32)
    n = vol.shape[0]
    if n >= box:
        s = n // 2 - box // 2
        return vol[s : s + box, s : s + box, s : s + box]
    out = np.zeros((box, box, box), np.float32)
    s = box // 2 - n // 2
    out[s : s + n, s : s + n, s : s + n] = vol
    return out


def downsampled_box(box: int, pixel_in_ang: float, pixel_out_ang: float) -> int:
    """Even box M ≈ N · pixel_in / pixel_out (never above N): the box that gives pixel_out."""
    if pixel_out_ang <= pixel_in_ang:
        return box
    m = int(round(box * pixel_in_ang / pixel_out_ang / 2.0)) * 2
    return max(2, min(box, m))


def downsample_to_pixel(images, pixel_in_ang: float, pixel_out_ang: float):
    """Fourier-crop (n, N, N) images to the even box closest to pixel size ``pixel_out_ang``.

    Never upsamples: if pixel_out_ang ≤ pixel_in_ang the images come back unchanged.
    Returns (images (n, M, M) float32, actual_pixel_ang = pixel_in_ang · N / M).
    """
    box = int(np.shape(images)[-1])
    m = downsampled_box(box, pixel_in_ang, pixel_out_ang)
    if m == box:
        return jnp.asarray(images, jnp.float32), float(pixel_in_ang)
    return fourier_crop(images, m), float(pixel_in_ang) * box / m


def target_pixel(target_resolution_ang: float) -> float:
    """Working pixel size of the paper: target resolution / 3 (Å)."""
    return float(target_resolution_ang) / PAPER_PIXEL_PER_RESOLUTION


def _radius_px(shape):
    """Distance from the centre (index N//2 on each axis) for a grid of the given shape."""
    axes = [jnp.arange(s) - s // 2 for s in shape]
    grids = jnp.meshgrid(*axes, indexing="ij")
    return jnp.sqrt(sum(g.astype(jnp.float32) ** 2 for g in grids))


@partial(jax.jit, static_argnames="radius_frac")
def normalize_background(images, radius_frac: float = 0.75):
    """RELION-style normalisation: per image, subtract the mean and divide by the standard deviation
    of the pixels outside a circle of radius ``radius_frac · N/2`` about the centre.

    images: (n, N, N).  Returns (n, N, N) float32 with background mean 0 and std 1.
    """
    images = jnp.asarray(images, jnp.float32)
    n_box = images.shape[-1]
    bg = _radius_px(images.shape[-2:]) > radius_frac * n_box / 2
    count = jnp.sum(bg)
    mean = jnp.sum(jnp.where(bg, images, 0.0), axis=(-2, -1), keepdims=True) / count
    var = jnp.sum(jnp.where(bg, (images - mean) ** 2, 0.0), axis=(-2, -1), keepdims=True) / count
    return ((images - mean) / jnp.sqrt(jnp.maximum(var, 1e-30))).astype(jnp.float32)


def lowpass_filter(shape, pixel_size_ang, resolution_ang, soft_edge_px=2.0):
    """Raised-cosine low-pass transfer function on the unshifted FFT grid of ``shape`` (2 or 3 axes,
    all equal to N). It is 1 below radius r_c - w, 0 from r_c on, with a cosine in between, where
    r_c = N · pixel / resolution (Fourier pixels) and w = soft_edge_px. Nothing at or beyond the
    cut-off survives. Returns float32 of ``shape``."""
    n_box = shape[-1]
    k = [jnp.asarray(np.fft.fftfreq(s) * n_box, jnp.float32) for s in shape]
    grids = jnp.meshgrid(*k, indexing="ij")
    r = jnp.sqrt(sum(g**2 for g in grids))
    r_c = n_box * jnp.asarray(pixel_size_ang, jnp.float32) / jnp.asarray(resolution_ang, jnp.float32)
    w = jnp.maximum(jnp.asarray(soft_edge_px, jnp.float32), 1e-6)
    t = jnp.clip((r - (r_c - w)) / w, 0.0, 1.0)
    return (0.5 + 0.5 * jnp.cos(jnp.pi * t)).astype(jnp.float32)


@partial(jax.jit, static_argnames="spatial_dims")
def lowpass(x, pixel_size_ang, resolution_ang, soft_edge_px=2.0, spatial_dims: int = 2):
    """Low-pass filter images or a map to ``resolution_ang`` with a raised-cosine edge.

    x: (..., N, N) image(s) with spatial_dims=2 (default), or (N, N, N) map with spatial_dims=3
        (see :func:`lowpass_volume`).  pixel_size_ang: Å/px.  soft_edge_px: edge width in Fourier px.
    Returns float32 array of x's shape; see :func:`lowpass_filter` for the transfer function.
    """
    x = jnp.asarray(x, jnp.float32)
    axes = tuple(range(-spatial_dims, 0))
    filt = lowpass_filter(x.shape[-spatial_dims:], pixel_size_ang, resolution_ang, soft_edge_px)
    return jnp.real(jnp.fft.ifftn(jnp.fft.fftn(x, axes=axes) * filt, axes=axes)).astype(jnp.float32)


def lowpass_volume(vol, pixel_size_ang, resolution_ang, soft_edge_px=2.0):
    """:func:`lowpass` for an (N, N, N) map."""
    return lowpass(vol, pixel_size_ang, resolution_ang, soft_edge_px, spatial_dims=3)


@partial(jax.jit, static_argnames="per_image")
def add_noise(key, images, snr, per_image: bool = False):
    """Add white Gaussian noise at a signal-to-noise ratio.

    SNR = var(signal) / σ², with var(signal) the variance of the clean pixels over the whole box:
    over the whole stack by default (one σ for every image, as a real data set with one dose), or
    per image when ``per_image``. key: jax PRNG key.  images: (n, N, N).  snr: scalar > 0.
    Returns (n, N, N) float32.
    """
    images = jnp.asarray(images, jnp.float32)
    if per_image:
        var = jnp.var(images, axis=(-2, -1), keepdims=True)
    else:
        var = jnp.var(images)
    sigma = jnp.sqrt(var / snr)
    return (images + sigma * jax.random.normal(key, images.shape, jnp.float32)).astype(jnp.float32)


@jax.jit
def apply_ctf(images, ctf):
    """Multiply (n, N, N) images by a CTF given on the unshifted FFT grid ((n, N, N) or (N, N),
    e.g. from ``ctf.ctf_2d``). Returns (n, N, N) float32."""
    images = jnp.asarray(images, jnp.float32)
    return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(images) * ctf)).astype(jnp.float32)
