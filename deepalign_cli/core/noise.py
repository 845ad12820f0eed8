"""The data's noise power spectrum, for the noise-weighted (whitened) correlation score.

Real noise is not white: ice, the detector and neighbouring particles put more power at low
frequencies (a real micrograph at 10 Å/px: ~2× below a quarter of Nyquist than near it). Plain NCC
weights every frequency alike, so that noise dominates its low band. Weighting each Fourier
coefficient by 1/σ²(|k|) (RELION's σ² in its likelihood; here on both sides of a normalised
correlation, `search.fourier_band`) scores the images as if the noise were white.

σ²(|k|) is estimated from the particles themselves, from their background: each image multiplied
by a mask that is 1 outside the particle disc (radius `bg_radius_frac` of the half box, as the
background normalisation) and 0 inside, Fourier transformed, |·|² averaged over every image and
over each integer frequency shell, and divided by the mask's mean square (the power a full image
of that noise would have). The mask's own spectrum smooths σ² over a few shells, which suits a
weight. Pure functions on arrays.
"""

from __future__ import annotations

import numpy as np

MIN_POWER_FRACTION = 1e-3  # shells below this fraction of the median power are floored to it (no division by ~0)


def background_mask(box: int, bg_radius_frac: float) -> np.ndarray:
    """(box, box) float32: 1 outside the disc of radius bg_radius_frac · box/2 around (N//2, N//2), else 0."""
    y, x = np.mgrid[:box, :box] - box // 2
    return (np.hypot(y, x) > bg_radius_frac * box / 2).astype(np.float32)


def shell_index(box: int) -> np.ndarray:
    """(box, box) int: the integer frequency shell round(|k|) of every coefficient of an unshifted FFT."""
    k = np.fft.fftfreq(box) * box
    return np.rint(np.hypot(*np.meshgrid(k, k, indexing="ij"))).astype(int)


def radial_power(images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean power per integer frequency shell (box//2 + 1,) of images (n, N, N), each made zero-mean
    over the mask (or the whole image) and multiplied by it, normalised by the mask's mean square.
    Shells 0 … N//2 (the corners beyond Nyquist are left out)."""
    images = np.asarray(images, np.float64)
    n, box = images.shape[0], images.shape[-1]
    mask = np.ones((box, box)) if mask is None else np.asarray(mask, np.float64)
    mean = (images * mask).sum(axis=(1, 2), keepdims=True) / mask.sum()
    power = (np.abs(np.fft.fft2((images - mean) * mask)) ** 2).sum(axis=0) / (n * (mask**2).mean())
    shells = shell_index(box)
    keep = shells <= box // 2
    totals = np.bincount(shells[keep], power[keep], minlength=box // 2 + 1)
    counts = np.bincount(shells[keep], minlength=box // 2 + 1)
    return (totals / np.maximum(counts, 1)).astype(np.float64)


def noise_power_spectrum(images: np.ndarray, bg_radius_frac: float) -> np.ndarray:
    """σ²(|k|) per shell (box//2 + 1,) from the images' backgrounds (module docstring), floored at
    MIN_POWER_FRACTION of its median so that no weight explodes."""
    box = np.shape(images)[-1]
    power = radial_power(images, background_mask(box, bg_radius_frac))
    return np.maximum(power, MIN_POWER_FRACTION * np.median(power[1:]))
