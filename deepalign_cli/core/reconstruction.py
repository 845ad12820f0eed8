"""Fourier-space reconstruction (direct Fourier inversion with Wiener CTF correction) and FSC.

The inverse of ``projector``: by the Fourier-slice theorem the 2D FT of a particle image, after
re-centring (translate by +origin) is the central slice V̂(Aᵀ·(kx, ky, 0)) of the map's 3D FT,
multiplied by the CTF. Each image is zero-padded ``pad``× (so its FT samples the slice on the same
fine grid as the padded 3D FT, as in RELION), Fourier-transformed, and inserted by trilinear
gridding (``.at[].add`` scatter of the 8 corner weights; the kx ≥ 0 half, the other half by
Friedel symmetry) into a (pad·N)³ centred grid:

    numerator(k)   = Σ_i w_i(k) · CTF_i · F_i          weight(k) = Σ_i w_i(k) · CTF_i²
    V̂(k)           = numerator / (weight + λ),         λ = wiener_constant · mean(weight in |k| ≤ Nyquist)

Without CTF, CTF = 1 and this is the (regularised) average of the inserted slices. The real-space
map is the centre N³ of the inverse FT, divided by the gridding kernel's transform sinc²(x / pN)
per axis (trilinear gridding multiplies the map by it). Frequencies beyond Nyquist are not inserted.

λ is relative so that it does not depend on the number of particles: the slice density at radius k
is ∝ n / k, the mean over the Nyquist sphere is 1.5× the density at Nyquist, so λ = 0.1 · mean damps
the Nyquist shell by ≈ 13 % and the low frequencies not at all.

CTFs are given as parameters (not as arrays) because they are evaluated on the PADDED grid,
``ctf_2d(pad·N, pixel)``, at the frequencies that are actually inserted.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import ctf as ctf_mod
from .geometry import eulers_to_matrices

DEFAULT_WIENER_CONSTANT = 0.1
DEFAULT_CHUNK = 64
FSC_THRESHOLD = 0.143
_CTF_KEYS = ("defocus_u_ang", "defocus_v_ang", "defocus_angle_deg", "voltage_kv", "cs_mm", "amplitude_contrast", "bfactor_ang2", "phase_shift_deg")


@partial(jax.jit, static_argnames=("pad", "use_ctf"), donate_argnums=(0,))
def _insert(acc, images, rotmats, origins_px, valid, ctf_values, pixel_size_ang, pad: int, use_ctf: bool):
    """Add a chunk of images to the accumulator: (M³, 3) float32 rows (Re numerator, Im numerator,
    weight) of the centred (M, M, M) grids, half of Fourier space (see :func:`backproject`).

    images: (b, N, N) float32.  rotmats: (b, 3, 3).  origins_px: (b, 2) (x, y) px.  valid: (b,)
    bool (padding rows add nothing).  ctf_values: tuple of (b,) CTF parameters (see _CTF_KEYS).
    """
    b, n = images.shape[0], images.shape[-1]
    m = pad * n
    start = m // 2 - n // 2
    padded = jnp.zeros((b, m, m), jnp.float32).at[:, start : start + n, start : start + n].set(images)
    f = jnp.fft.rfft2(jnp.fft.ifftshift(padded, axes=(-2, -1)))  # origin at the image centre; kx ≥ 0
    kx1 = jnp.arange(m // 2 + 1, dtype=jnp.float32)
    ky, kx = jnp.meshgrid(jnp.asarray(np.fft.fftfreq(m) * m, jnp.float32), kx1, indexing="ij")
    f = f * jnp.exp((-2j * jnp.pi / m) * (kx * origins_px[:, 0, None, None] + ky * origins_px[:, 1, None, None]))
    if use_ctf:
        c = ctf_mod.ctf_2d(m, pixel_size_ang, *ctf_values)[..., : m // 2 + 1]
    else:
        c = jnp.ones((b, m, m // 2 + 1), jnp.float32)
    # the kx = 0 and kx = M/2 columns hold their own Friedel mates: half weight each
    column = jnp.where((kx1 == 0) | (kx1 == m // 2), 0.5, 1.0)
    inside = (kx**2 + ky**2) <= (m / 2) ** 2
    keep = (inside[None] & valid[:, None, None]).astype(jnp.float32) * column
    v = c * f * keep
    vals = jnp.stack([v.real, v.imag, c * c * keep], -1).reshape(-1, 3)
    q = kx[None, ..., None] * rotmats[:, None, None, 0, :] + ky[None, ..., None] * rotmats[:, None, None, 1, :]
    coords = (m // 2 + q[..., ::-1]).reshape(-1, 3)  # (z, y, x) indices
    c0 = jnp.floor(coords)
    fr = coords - c0
    i0 = c0.astype(jnp.int32)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx = i0 + jnp.array([dz, dy, dx], jnp.int32)
                w = (fr[:, 0] if dz else 1 - fr[:, 0]) * (fr[:, 1] if dy else 1 - fr[:, 1]) * (fr[:, 2] if dx else 1 - fr[:, 2])
                ok = jnp.all((idx >= 0) & (idx < m), axis=-1)
                w = jnp.where(ok, w, 0.0)
                flat = (jnp.clip(idx[:, 0], 0, m - 1) * m + jnp.clip(idx[:, 1], 0, m - 1)) * m + jnp.clip(idx[:, 2], 0, m - 1)
                acc = acc.at[flat].add(w[:, None] * vals)  # one scatter per corner: faster than one of all 8
    return acc


def _mirror(x):
    """x(−k) on the centred grid (DC at M//2): index i ↦ (M − i) mod M on every axis."""
    for ax in range(3):
        x = jnp.roll(jnp.flip(x, ax), 1, ax)
    return x


@jax.jit
def _friedel_complete(acc):
    """Full numerator and weight grids from the (M, M, M, 3) half-space accumulator: a real
    image's transform obeys F(−k) = conj F(k) and the CTF is even, so inserting the kx < 0 half
    would add conj(v) at −q with mirrored trilinear weights — the mirrored grid."""
    num, wt = lax.complex(acc[..., 0], acc[..., 1]), acc[..., 2]
    return num + jnp.conj(_mirror(num)), wt + _mirror(wt)


def backproject(images, eulers_deg, origins_px, ctf_params: Mapping | None = None, pixel_size_ang: float = 1.0, pad: int = 2, chunk: int = DEFAULT_CHUNK):
    """Accumulate the numerator and weight grids of direct Fourier inversion.

    Only the kx ≥ 0 half of each image's transform is inserted (one trilinear scatter per corner
    of (Re, Im, weight) rows) and the grids are completed by Friedel symmetry at the end: 6× faster
    than inserting the whole plane into separate complex and weight grids (640 particles at 32 px:
    0.12 vs 0.71 s), equal to it to 2e-6 inside the Nyquist sphere (on the sphere itself the
    ±Nyquist samples are now split evenly between their two aliases).

    images: (n, N, N) float array-like (a memmap is read chunk by chunk).  eulers_deg: (n, 3)
    RELION rot/tilt/psi.  origins_px: (n, 2) RELION (OriginX, OriginY) in px.
    ctf_params: None or mapping of per-particle (n,) or scalar CTF parameters (keys as
    ``ctf.ctf_2d``: defocus_u_ang, defocus_v_ang, defocus_angle_deg, voltage_kv, cs_mm,
    amplitude_contrast, optional bfactor_ang2, phase_shift_deg).  pixel_size_ang: Å/px (CTF only).
    Returns (numerator (M, M, M) complex64, weight (M, M, M) float32), M = pad·N, centred (DC at M//2).
    """
    n, box = len(images), np.shape(images[0])[-1]
    m = pad * box
    acc = jnp.zeros((m**3, 3), jnp.float32)
    rot_all = eulers_to_matrices(np.asarray(eulers_deg, float)).astype(np.float32)
    origins_all = np.asarray(origins_px, np.float32)
    params = None
    if ctf_params is not None:
        params = [np.broadcast_to(np.asarray(ctf_params.get(k, 0.0), np.float32), (n,)) for k in _CTF_KEYS]
    for s in range(0, n, chunk):
        idx = np.arange(s, min(s + chunk, n))
        fill = np.concatenate([idx, np.full(chunk - len(idx), idx[0])])
        valid = np.arange(chunk) < len(idx)
        imgs = np.stack([np.asarray(images[i], np.float32) for i in fill])
        cvals = tuple(jnp.asarray(p[fill]) for p in params) if params is not None else ()
        acc = _insert(acc, jnp.asarray(imgs), jnp.asarray(rot_all[fill]), jnp.asarray(origins_all[fill]),
                      jnp.asarray(valid), cvals, pixel_size_ang, pad=pad, use_ctf=params is not None)
    return _friedel_complete(acc.reshape(m, m, m, 3))


@partial(jax.jit, static_argnames=("box",))
def finalize(num, wt, box: int, wiener_constant: float = DEFAULT_WIENER_CONSTANT):
    """Map (box, box, box) float32 from accumulated grids: Wiener division, inverse FT, crop,
    gridding correction. num/wt: (M, M, M) from :func:`backproject` (or sums of them)."""
    m = num.shape[0]
    k = jnp.arange(m) - m // 2
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    inside = r2 <= (m // 2) ** 2
    lam = wiener_constant * jnp.sum(jnp.where(inside, wt, 0.0)) / jnp.sum(inside)
    ft = jnp.where(inside, num / (wt + lam), 0.0)
    vol = jnp.real(jnp.fft.fftshift(jnp.fft.ifftn(jnp.fft.ifftshift(ft))))
    start = m // 2 - box // 2
    vol = vol[start : start + box, start : start + box, start : start + box]
    g = jnp.sinc((jnp.arange(box) - box // 2) / m) ** 2
    return (vol / (g[:, None, None] * g[None, :, None] * g[None, None, :])).astype(jnp.float32)


def reconstruct(images, eulers_deg, origins_px, ctf_params: Mapping | None = None, pixel_size_ang: float = 1.0, pad: int = 2,
                wiener_constant: float = DEFAULT_WIENER_CONSTANT, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Map (N, N, N) float32 from particle images with known poses (arguments as :func:`backproject`).

    Consistent with ``projector``: images made by ``project(prepare_volume(V), A, origin)`` give
    back V (band-limited to Nyquist).
    """
    num, wt = backproject(images, eulers_deg, origins_px, ctf_params, pixel_size_ang, pad, chunk)
    return np.asarray(finalize(num, wt, box=np.shape(images[0])[-1], wiener_constant=wiener_constant))


def reconstruct_halves(images, eulers_deg, origins_px, key, ctf_params: Mapping | None = None, pixel_size_ang: float = 1.0,
                       pad: int = 2, wiener_constant: float = DEFAULT_WIENER_CONSTANT, chunk: int = DEFAULT_CHUNK) -> dict:
    """Gold-standard split: particles randomly in two halves (key: jax PRNG key), one map each and
    the full map from the summed grids (one pass over the images).

    Returns dict: map, half1, half2 ((N, N, N) float32), half (n,) int 0/1 per particle.
    """
    n, box = len(images), np.shape(images[0])[-1]
    perm = np.asarray(jax.random.permutation(key, n))
    half = np.zeros(n, int)
    half[perm[n // 2 :]] = 1
    eulers, origins = np.asarray(eulers_deg), np.asarray(origins_px)
    grids = []
    for h in (0, 1):
        sel = np.flatnonzero(half == h)
        sub_ctf = None
        if ctf_params is not None:
            sub_ctf = {k: (np.asarray(v)[sel] if np.ndim(v) else v) for k, v in ctf_params.items()}
        grids.append(backproject(_Rows(images, sel), eulers[sel], origins[sel], sub_ctf, pixel_size_ang, pad, chunk))
    (n1, w1), (n2, w2) = grids
    fin = partial(finalize, box=box, wiener_constant=wiener_constant)
    return {
        "map": np.asarray(fin(n1 + n2, w1 + w2)),
        "half1": np.asarray(fin(n1, w1)),
        "half2": np.asarray(fin(n2, w2)),
        "half": half,
    }


class _Rows:
    """Lazy row subset of an image stack (keeps a memmap on disk)."""

    def __init__(self, images, rows):
        self.images, self.rows = images, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.images[int(self.rows[i])]


def fsc(map1, map2) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two (N, N, N) maps.

    Returns (freqs (K,), fsc (K,)), K = N//2 + 1 shells of width 1/N; freqs in cycles per pixel
    (0 … 0.5), fsc[0] is the DC shell.
    """
    f1, f2 = np.fft.fftn(np.asarray(map1, np.float64)), np.fft.fftn(np.asarray(map2, np.float64))
    n = f1.shape[0]
    k = np.fft.fftfreq(n) * n
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shell = np.round(r).astype(int).ravel()
    n_shells = n // 2 + 1
    sel = shell < n_shells
    shell = shell[sel]
    cross = np.bincount(shell, (f1 * np.conj(f2)).real.ravel()[sel], n_shells)
    p1 = np.bincount(shell, (np.abs(f1) ** 2).ravel()[sel], n_shells)
    p2 = np.bincount(shell, (np.abs(f2) ** 2).ravel()[sel], n_shells)
    return np.arange(n_shells) / n, cross / np.sqrt(np.maximum(p1 * p2, np.finfo(float).tiny))


def resolution_at(freqs, fsc_values, pixel_size_ang: float, threshold: float = FSC_THRESHOLD) -> float:
    """Resolution (Å) where the FSC first drops below `threshold` (linear interpolation between
    shells); 2 × pixel (Nyquist) when it never does."""
    freqs, fsc_values = np.asarray(freqs), np.asarray(fsc_values)
    below = np.flatnonzero(fsc_values[1:] < threshold)
    if len(below) == 0:
        return float(pixel_size_ang / freqs[-1])
    i = below[0] + 1
    f0, f1, c0, c1 = freqs[i - 1], freqs[i], fsc_values[i - 1], fsc_values[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)
    return float(pixel_size_ang / f)


# ------------------------------------------------------------------- FSC weighting
def shell_index(box: int) -> np.ndarray:
    """(N, N, N) int: the Fourier shell of every coefficient of an unshifted 3D FFT (as :func:`fsc`)."""
    k = np.fft.fftfreq(box) * box
    return np.round(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)


def fsc_weights(fsc_curve) -> np.ndarray:
    """Per-shell weights sqrt(2·FSC / (1 + FSC)) from the FSC between two half maps: the expected
    correlation of the map of both halves with the truth (Rosenthal & Henderson's C_ref), so a
    noisy shell counts for what it is worth. 0 where FSC ≤ 0, and from the first shell where the
    FSC is ≤ 0 outwards (beyond it the shells hold noise); shell 0 (the mean) keeps weight 1."""
    f = np.asarray(fsc_curve, float)
    w = np.sqrt(np.clip(2 * f / (1 + np.maximum(f, 0.0)), 0.0, None))
    bad = np.flatnonzero(f[1:] <= 0)
    if len(bad):
        w[bad[0] + 1 :] = 0.0
    w[0] = 1.0
    return w


def shell_filter(vol, weights) -> np.ndarray:
    """A map (N, N, N) with its Fourier shell k multiplied by weights[k] (0 past the last weight)."""
    vol = np.asarray(vol, np.float32)
    shells = shell_index(vol.shape[0])
    w = np.concatenate([np.asarray(weights, float), [0.0]])
    return np.real(np.fft.ifftn(np.fft.fftn(vol) * w[np.minimum(shells, len(w) - 1)])).astype(np.float32)


def supported_resolution_ang(fsc_curve, box: int, pixel_ang: float) -> float:
    """The finest resolution (Å) whose shell keeps a positive :func:`fsc_weights` weight — the band
    a map weighted by that curve supports, never finer than Nyquist (2 × pixel). The curve has the
    N//2 + 1 shells of :func:`fsc` for a box of N px (shell s at s / N cycles per pixel)."""
    w = fsc_weights(fsc_curve)
    last = int(np.flatnonzero(w > 0)[-1])
    return float(max(box * pixel_ang / max(last, 1), 2.0 * pixel_ang))
