"""Synthetic training examples: projections of the reference map with the data's own CTFs and noise.

The labelled subset is small (the paper: 5,000 of 85,000 particles; ~10–50 per region) and at
realistic SNR too small to learn 42 regions from. The reference map is not: any number of exactly
labelled examples can be made from it. Each synthetic image is

    image = normalise( IFT[ CTF_j · S(−origin) · P̂(A) ] · a  +  coloured noise )

with A uniform over SO(3) (its label: the region of its projection direction), CTF_j the CTF of a
real particle j drawn from the project's table (defocus, astigmatism, voltage, Cs, amplitude
contrast), origin uniform within the data's shift range, and Gaussian noise whose radial power
spectrum is the real particles' (:func:`radial_power`: at SNR ≤ 0.1 a particle's power is ~90 %
noise), scaled so that var(signal) / var(noise) is the data's SNR (:func:`estimate_snr`: the
labelled particles against the reference at their poses). The normalisation is the one real
particles get (``preprocess.normalize_background``). Everything per image runs in one jitted
program per chunk (:func:`synthetic_chunk`) on the default device.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import ctf as ctf_mod
from . import geometry, projector
from .preprocess import normalize_background
from .regions import assign_regions
from .simulate import random_eulers_deg

CTF_KEYS = ("defocus_u_ang", "defocus_v_ang", "defocus_angle_deg", "voltage_kv", "cs_mm", "amplitude_contrast", "bfactor_ang2",
            "phase_shift_deg")
SNR_RANGE = (1e-3, 10.0)  # a measured SNR is clipped to this range


def _shells(box: int) -> np.ndarray:
    """(N, N) int: the Fourier shell round(|k|) of every coefficient of an unshifted 2D FFT."""
    k = np.fft.fftfreq(box) * box
    return np.round(np.hypot(k[:, None], k[None, :])).astype(int)


def radial_power(images) -> np.ndarray:
    """(N//2 + 1 + …,) mean power |FFT|² / N² per Fourier shell of images (n, N, N) (white noise of
    variance 1 gives 1 in every shell); the DC shell is set to 0."""
    images = np.asarray(images, np.float32)
    box = images.shape[-1]
    power = (np.abs(np.fft.fft2(images)) ** 2).mean(axis=0) / box**2
    shells = _shells(box).ravel()
    out = np.bincount(shells, power.ravel()) / np.maximum(np.bincount(shells), 1)
    out[0] = 0.0
    return out.astype(np.float32)


def ctf_table(ctf_params: Mapping | None, n: int) -> np.ndarray | None:
    """(n, 8) float32 rows of per-particle CTF parameters (CTF_KEYS order), None without a CTF."""
    if ctf_params is None:
        return None
    return np.stack([np.broadcast_to(np.asarray(ctf_params.get(k, 0.0), np.float32), (n,)) for k in CTF_KEYS], axis=1)


@jax.jit
def _fit_signal(images, model):
    """Per image: (var of the scaled model a·m, var of the residual I − a·m), a least squares."""
    a = jnp.sum(images * model, axis=(1, 2)) / jnp.maximum(jnp.sum(model * model, axis=(1, 2)), 1e-30)
    fit = a[:, None, None] * model
    return jnp.var(fit, axis=(1, 2)), jnp.var(images - fit, axis=(1, 2))


def estimate_snr(images, vol_ft: projector.VolumeFT, eulers_deg, origins_px, ctfs, chunk: int = 128) -> float:
    """var(signal) / var(noise) of particles (n, N, N) with known poses: each image is fitted by its
    scaled reference projection (CTF applied, translated by −origin) and the signal is the fit, the
    noise the residual (the residual also holds what the reference lacks, so a poor reference gives
    a low estimate). ctfs: (n, N, N) on the unshifted grid, or None. Clipped to SNR_RANGE."""
    images = np.asarray(images, np.float32)
    rot = geometry.eulers_to_matrices(np.asarray(eulers_deg, float)).astype(np.float32)
    sig, noise = [], []
    for s in range(0, len(images), chunk):
        sl = slice(s, s + chunk)
        ft = projector.project_ft(vol_ft, jnp.asarray(rot[sl]), jnp.asarray(np.asarray(origins_px, np.float32)[sl]))
        if ctfs is not None:
            ft = ft * jnp.asarray(ctfs[sl])
        v_s, v_n = _fit_signal(jnp.asarray(images[sl]), jnp.real(jnp.fft.ifft2(ft)))
        sig.append(np.asarray(v_s))
        noise.append(np.asarray(v_n))
    snr = float(np.mean(np.concatenate(sig)) / max(np.mean(np.concatenate(noise)), 1e-30))
    return float(np.clip(snr, *SNR_RANGE))


@partial(jax.jit, static_argnames=("n", "use_ctf", "bg_radius_frac"))
def synthetic_chunk(key, vol_ft: projector.VolumeFT, ctf_rows, noise_amplitude, snr, max_shift_px, pixel_ang, n: int, use_ctf: bool,
                    bg_radius_frac: float = 0.75):
    """n synthetic particles: (images (n, N, N) float32 normalised like real ones, eulers (n, 3) degrees,
    origins (n, 2) px).

    ctf_rows: (m, 8) CTF parameters of real particles (CTF_KEYS order), each image draws one row.
    noise_amplitude: (N, N) sqrt of the noise power on the unshifted grid (:func:`noise_amplitude`).
    snr: var(signal) / var(noise) of the chunk.  max_shift_px: origins uniform in ±max (x, y).
    """
    k_pose, k_shift, k_ctf, k_noise = jax.random.split(key, 4)
    box = vol_ft.box
    eulers = random_eulers_deg(k_pose, n)
    origins = jax.random.uniform(k_shift, (n, 2), minval=-max_shift_px, maxval=max_shift_px)
    ft = projector.project_ft(vol_ft, geometry.eulers_to_matrices(eulers), origins)
    if use_ctf:
        rows = ctf_rows[jax.random.randint(k_ctf, (n,), 0, ctf_rows.shape[0])]
        ft = ft * ctf_mod.ctf_2d(box, pixel_ang, *(rows[:, i] for i in range(len(CTF_KEYS))))
    clean = jnp.real(jnp.fft.ifft2(ft))
    noise = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(jax.random.normal(k_noise, (n, box, box))) * noise_amplitude))
    noise = noise / jnp.maximum(jnp.std(noise), 1e-30)
    sigma = jnp.std(clean) / jnp.sqrt(snr)
    images = normalize_background(clean + sigma * noise, bg_radius_frac)
    return images, eulers, origins


def noise_amplitude(power_per_shell, box: int) -> np.ndarray:
    """(N, N) float32 sqrt of a radial power spectrum (:func:`radial_power`) on the unshifted grid
    (shells beyond its length get its last value; DC 0)."""
    p = np.asarray(power_per_shell, float)
    shells = np.minimum(_shells(box), len(p) - 1)
    amp = np.sqrt(np.maximum(p[shells], 0.0))
    amp[0, 0] = 0.0
    return amp.astype(np.float32)


def synthetic_examples(key, vol_ft: projector.VolumeFT, n: int, centres: np.ndarray, ops: np.ndarray, *, pixel_ang: float,
                       ctf_rows: np.ndarray | None, noise_power: np.ndarray, snr: float, max_shift_px: float,
                       bg_radius_frac: float = 0.75, chunk: int = 256) -> dict:
    """n synthetic particles with their region labels (module docstring).

    vol_ft: the reference at the working box and pixel.  centres (R, 3), ops (G, 3, 3): the project's
    regions.  ctf_rows: :func:`ctf_table` of the real particles (None: no CTF).  noise_power:
    :func:`radial_power` of real particles at the same box.  snr: :func:`estimate_snr`.
    Returns dict: images (n, N, N) float32, labels (n,) int (region of the projection direction),
    eulers_deg (n, 3), origins_px (n, 2).
    """
    amp = jnp.asarray(noise_amplitude(noise_power, vol_ft.box))
    rows = jnp.asarray(ctf_rows if ctf_rows is not None else np.zeros((1, len(CTF_KEYS)), np.float32))
    chunk = max(1, min(chunk, n))
    images, eulers, origins = [], [], []
    for c, start in enumerate(range(0, n, chunk)):
        im, eu, og = synthetic_chunk(jax.random.fold_in(key, c), vol_ft, rows, amp, jnp.float32(snr), jnp.float32(max_shift_px),
                                     jnp.float32(pixel_ang), n=chunk, use_ctf=ctf_rows is not None, bg_radius_frac=bg_radius_frac)
        k = min(chunk, n - start)
        images.append(np.asarray(im)[:k])
        eulers.append(np.asarray(eu, float)[:k])
        origins.append(np.asarray(og, float)[:k])
    eulers = np.concatenate(eulers)
    labels, _ = assign_regions(geometry.eulers_to_matrices(eulers)[:, 2, :], centres, ops)
    return {"images": np.concatenate(images), "labels": labels.astype(int), "eulers_deg": eulers, "origins_px": np.concatenate(origins)}
