"""The correlation score of the search (`search`, `align`): band-limited, CTF-aware normalised
cross-correlation of a particle with a reference projection, computed on Fourier coefficients.

Score. The normalised cross-correlation between the particle image I and the CTF-modulated
reference projection R at pose A, after translating the particle by +s (which re-centres it, so s
is the RELION origin):

    NCC(A, s) = Σ_k w_k Re[ conj(CTF_k R_k(A)) · I_k e^{-2πi k·s/N} ]
                / ( sqrt(Σ_k w_k |I_k|²) · sqrt(Σ_k w_k CTF_k² |R_k(A)|²) )

summed over the Fourier "band" 0 < |k| ≤ k_max (no DC, so image offsets do not matter; k_max from
the reference low-pass, Nyquist by default) on the rfft half plane with Hermitian weights w_k
(1 on the self-conjugate columns kx = 0 and kx = N/2, 2 elsewhere), which equals the real-space
correlation of the band-passed images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import ctf as ctf_mod
from .projector import VolumeFT, sample_slices

NORM_EPS = 1e-12


@partial(jax.tree_util.register_dataclass, data_fields=["flat_index", "kx", "ky", "sqrt_weight"], meta_fields=["box"])
@dataclasses.dataclass(frozen=True)
class FourierBand:
    """Fourier coefficients used by the score (a JAX pytree; ``box`` static).

    flat_index: (K,) int32 index into a flattened (N, N) unshifted full FFT.
    kx, ky: (K,) float32 integer frequencies (cycles per box), signed as ``np.fft.fftfreq · N``.
    sqrt_weight: (K,) float32 square root of the Hermitian weight (1 or 2).
    """

    flat_index: jax.Array
    kx: jax.Array
    ky: jax.Array
    sqrt_weight: jax.Array
    box: int


def fourier_band(box: int, pixel_size_ang: float, lowpass_resolution_ang: float | None = None) -> FourierBand:
    """Half-plane coefficients with 0 < |k| ≤ k_max, k_max = N·pixel/resolution (≤ N/2, Nyquist).

    box: N px.  pixel_size_ang: Å/px.  lowpass_resolution_ang: Å, None → Nyquist.
    """
    k_max = box / 2.0
    if lowpass_resolution_ang is not None:
        k_max = min(k_max, box * pixel_size_ang / lowpass_resolution_ang)
    kfull = np.fft.fftfreq(box) * box
    ky, kx = np.meshgrid(kfull, kfull[: box // 2 + 1], indexing="ij")
    r2 = kx**2 + ky**2
    sel = (r2 > 0) & (r2 <= k_max**2)
    rows, cols = np.nonzero(sel)
    self_conj = (kx[sel] == 0) | ((box % 2 == 0) & (np.abs(kx[sel]) == box // 2))  # -N/2 in fftfreq
    weight = np.where(self_conj, 1.0, 2.0)
    return FourierBand(
        jnp.asarray(rows * box + cols, jnp.int32),
        jnp.asarray(kx[sel], jnp.float32),
        jnp.asarray(ky[sel], jnp.float32),
        jnp.asarray(np.sqrt(weight), jnp.float32),
        box,
    )


def band_values(band: FourierBand, arrays):
    """(n, N, N) full-FFT arrays → (n, K) band coefficients."""
    n = arrays.shape[0]
    return arrays.reshape(n, -1)[:, band.flat_index]


def phases(band: FourierBand, shifts):
    """e^{-2πi k·s/N} for shifts (..., 2) → (..., K) complex64 (translates content by +s)."""
    arg = shifts[..., 0:1] * band.kx + shifts[..., 1:2] * band.ky
    return jnp.exp((-2j * jnp.pi / band.box) * arg).astype(jnp.complex64)


def band_projections(vol_ft: VolumeFT, band: FourierBand, rotmats):
    """Band coefficients (n, K) complex64 of the projections at poses (n, 3, 3): the same values as
    ``project_ft(vol_ft, rotmats)`` gathered at ``band.flat_index``, but only the K band samples
    are interpolated (``projector.sample_slices``)."""
    vals = sample_slices(vol_ft, rotmats, band.kx, band.ky)
    return vals * phases(band, jnp.full((2,), float(vol_ft.box // 2)))  # image centre at N//2


def weighted_refs(vol_ft, band, rotmats):
    """(n, 3, 3) poses → (n, K) complex band coefficients of the projections, × sqrt(w)."""
    return band_projections(vol_ft, band, rotmats) * band.sqrt_weight


@jax.jit
def particle_features(images, ctfs, band: FourierBand):
    """Score-side vectors of a chunk of particles: (CTF·√w·Î (b, K) complex, CTF² (b, K), ‖√w·Î‖ (b,)).

    images: (b, N, N) float32.  ctfs: (b, N, N) float32 on the unshifted grid (ones: no CTF).
    """
    f = band_values(band, jnp.fft.fft2(images.astype(jnp.float32))) * band.sqrt_weight
    c = band_values(band, ctfs.astype(jnp.float32))
    return c * f, c * c, jnp.sqrt(jnp.sum(jnp.abs(f) ** 2, axis=-1))


@jax.jit
def reference_table(vol_ft: VolumeFT, band: FourierBand, rotmats):
    """Cached references of poses (r, 3, 3): ([Re, Im] of √w·R (r, 2K) float32, w·|R|² (r, K))."""
    rw = weighted_refs(vol_ft, band, rotmats)
    return jnp.concatenate([rw.real, rw.imag], axis=-1), jnp.abs(rw) ** 2


def pose_scores(jj, rws, c2, inorm):
    """Scores (b, a, 9) of references rws (b, a, K) against shifted particles jj (b, 9, K)."""
    cc = jnp.einsum("bqk,bak->baq", jj, jnp.conj(rws)).real
    rnorm = jnp.sqrt(jnp.einsum("bk,bak->ba", c2, jnp.abs(rws) ** 2))
    return cc / (inorm[:, None, None] * rnorm[:, :, None] + NORM_EPS)


def particle_ctfs(ctf_params: Mapping | None, idx: np.ndarray, box: int, pixel_size_ang: float):
    """(b, N, N) CTFs of the particles idx (ones without CTF)."""
    if ctf_params is None:
        return jnp.ones((len(idx), box, box), jnp.float32)

    def pick(key, default=0.0):
        v = np.asarray(ctf_params.get(key, default), np.float32)
        return v[idx] if v.ndim else v

    return ctf_mod.ctf_2d(
        box,
        pixel_size_ang,
        pick("defocus_u_ang"),
        pick("defocus_v_ang"),
        pick("defocus_angle_deg"),
        pick("voltage_kv"),
        pick("cs_mm"),
        pick("amplitude_contrast"),
        pick("bfactor_ang2"),
        pick("phase_shift_deg"),
    )
