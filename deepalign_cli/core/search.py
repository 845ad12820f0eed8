"""Restricted correlation search (`align`): rot, tilt, psi and shifts of every particle against
projections of a reference map, only inside the particle's candidate regions.

Score. The normalised cross-correlation between the particle image I and the CTF-modulated
reference projection R at pose A, after translating the particle by +s (which re-centres it, so s
is the RELION origin):

    NCC(A, s) = Σ_k w_k Re[ conj(CTF_k R_k(A)) · I_k e^{-2πi k·s/N} ]
                / ( sqrt(Σ_k w_k |I_k|²) · sqrt(Σ_k w_k CTF_k² |R_k(A)|²) )

summed over the Fourier "band" 0 < |k| ≤ k_max (no DC, so image offsets do not matter; k_max from
the reference low-pass, Nyquist by default) on the rfft half plane with Hermitian weights w_k
(1 on the self-conjugate columns kx = 0 and kx = N/2, 2 elsewhere), which equals the real-space
correlation of the band-passed images.

Shifts by one matrix product instead of one FFT per pair. For a fixed particle, the numerator at
every shift s of a disc (|s| ≤ max_shift) is a dot product between the reference vector
[Re R, Im R] and the vector J_s = CTF · I · e^{-2πi k·s/N}. Stacking the S shifted particle
vectors of a chunk of b particles gives a (b·S, 2K) matrix, and one GEMM with the (2K, r) reference
matrix scores every (particle, shift, reference) triple. Measured against one inverse FFT per
(particle, reference) pair on this CPU this is much faster (GEMMs run near peak, batched small FFTs
do not), it only evaluates the shifts of the max-shift disc, and with the band limit K ≈ π k_max²/2
instead of N². The CTF is real, so it is folded into the particle side and the references are
shared by every particle of a region group.

References: every (gallery direction, psi) pair is projected directly with the Fourier-slice
projector at (rot, tilt, psi) — an in-plane rotation of a central slice IS the slice of the rotated
pose, so this is the exact in-plane rotation at the cost of one slice (N² trilinear samples),
against b·S·2K multiply-adds to correlate it with a chunk of b particles: for b ≥ 16 particles the
projection is a few percent of the work. References are therefore generated chunk by chunk inside
the jitted loop (constant memory, no cache that has to fit the budget).

Refinement (``refine_passes`` > 0): around the best pose, a 3 × 3 × 3 grid of small rotations
(tilts of ±h about the image x and y axes and ±h_psi about z, applied in the image frame so it is
the same at the poles) times a 3 × 3 grid of sub-pixel shifts (±h_s); h = step/2, h_psi =
psi_step/2, h_s = 1/2 px in pass 1, halved at every pass. Each pass keeps the best of the grid
(the centre is in the grid, so the score never decreases).

Everything for one particle chunk — particle FTs, coarse search over all reference chunks
(a dynamic-length loop, so region groups of different sizes share one compiled program) and the
refinement passes — is one ``jax.jit`` program with static shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import ctf as ctf_mod
from .gallery import region_gallery_indices, sphere_lattice
from .geometry import direction_to_angles, euler_to_matrix, matrix_to_euler
from .projector import VolumeFT, _trilinear
from .regions import assign_regions

REFINE_PASSES = 3  # refinement passes; pass p searches ±step/2^p, ±psi_step/2^p, ±1/2^p px
BYTES_F32 = 4
MAX_PARTICLE_CHUNK = 256
NORM_EPS = 1e-12
# transient arrays of one reference/refinement projection, in units of one (N, N) complex64 image
PROJECTION_WORK_FACTOR = 6


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


def shift_disc(max_shift_px: float) -> np.ndarray:
    """Integer shifts (S, 2) (x, y) px with |s| ≤ max_shift_px, (0, 0) first."""
    r = int(np.floor(max_shift_px))
    g = np.arange(-r, r + 1)
    sx, sy = np.meshgrid(g, g, indexing="xy")
    s = np.stack([sx.ravel(), sy.ravel()], axis=-1)
    s = s[(s**2).sum(-1) <= max_shift_px**2 + 1e-9]
    order = np.argsort((s**2).sum(-1), kind="stable")
    return s[order].astype(np.float32)


def psi_angles(psi_step_deg: float) -> np.ndarray:
    """In-plane angles (p,) degrees: [0, 360) at a step ≤ psi_step_deg (p = ceil(360/step))."""
    p = int(np.ceil(360.0 / psi_step_deg - 1e-9))
    return np.arange(p) * (360.0 / p)


def gallery_poses(dirs: np.ndarray, psi_step_deg: float) -> np.ndarray:
    """Pose matrices (m·p, 3, 3) for every gallery direction (m, 3) and every psi (direction-major)."""
    rot, tilt = direction_to_angles(np.asarray(dirs, float))
    psi = psi_angles(psi_step_deg)
    return euler_to_matrix(
        np.repeat(rot, len(psi)), np.repeat(tilt, len(psi)), np.tile(psi, len(rot))
    ).astype(np.float32)


def chunk_sizes(box: int, n_coeffs: int, n_shifts: int, n_refs: int, memory_budget_gb: float) -> tuple[int, int]:
    """(particle_chunk, reference_chunk) whose transient arrays fit in memory_budget_gb.

    Budget split: half to the particle side (shifted particle vectors b·S·2K, the score block
    b·S·r_c and the 27 refinement projections per particle), a quarter to the projections of one
    reference chunk. Both chunks are at least 1; the particle chunk is capped at
    MAX_PARTICLE_CHUNK and the reference chunk at n_refs.
    """
    budget = memory_budget_gb * 2**30
    img = box * box * 8 * PROJECTION_WORK_FACTOR
    ref_chunk = int(max(1, min(n_refs, budget / 4 / (img + 2 * n_coeffs * BYTES_F32))))
    per_particle = n_shifts * (2 * n_coeffs + ref_chunk) * BYTES_F32 + 27 * img
    particle_chunk = int(max(1, min(MAX_PARTICLE_CHUNK, budget / 2 / per_particle)))
    return particle_chunk, ref_chunk


def _band_values(band: FourierBand, arrays):
    """(n, N, N) full-FFT arrays → (n, K) band coefficients."""
    n = arrays.shape[0]
    return arrays.reshape(n, -1)[:, band.flat_index]


def _phases(band: FourierBand, shifts):
    """e^{-2πi k·s/N} for shifts (..., 2) → (..., K) complex64 (translates content by +s)."""
    arg = shifts[..., 0:1] * band.kx + shifts[..., 1:2] * band.ky
    return jnp.exp((-2j * jnp.pi / band.box) * arg).astype(jnp.complex64)


def band_projections(vol_ft: VolumeFT, band: FourierBand, rotmats):
    """Band coefficients (n, K) complex64 of the projections at poses (n, 3, 3): the same values as
    ``project_ft(vol_ft, rotmats)`` gathered at ``band.flat_index``, but only the K band samples
    are interpolated (K/N² ≈ 0.17 when the band ends at 3 px), which makes reference generation
    ~6× cheaper."""
    m = vol_ft.box * vol_ft.pad
    rot = jnp.asarray(rotmats, jnp.float32)
    q = band.kx[None, :, None] * rot[:, None, 0, :] + band.ky[None, :, None] * rot[:, None, 1, :]
    vals = _trilinear(vol_ft.ft_centred.reshape(-1), m, m // 2 + vol_ft.pad * q[..., ::-1])
    return vals * _phases(band, jnp.full((2,), float(vol_ft.box // 2)))  # image centre at N//2


def _weighted_refs(vol_ft, band, rotmats):
    """(n, 3, 3) poses → (n, K) complex band coefficients of the projections, × sqrt(w)."""
    return band_projections(vol_ft, band, rotmats) * band.sqrt_weight


def _axis_rotation(axis: int, angle_rad):
    """Right-handed rotation matrix (3, 3) about coordinate axis 0/1/2 (x/y/z)."""
    c, s = jnp.cos(angle_rad), jnp.sin(angle_rad)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    m = jnp.eye(3, dtype=jnp.float32)
    return m.at[i, i].set(c).at[j, j].set(c).at[i, j].set(-s).at[j, i].set(s)


def _local_rotations(half_dir_rad, half_psi_rad):
    """27 image-frame perturbations Rz(c·hψ)·Rx(a·h)·Ry(b·h), a, b, c ∈ {-1, 0, 1}. (27, 3, 3)."""
    mats = []
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            for c in (-1, 0, 1):
                mats.append(
                    _axis_rotation(2, c * half_psi_rad) @ _axis_rotation(0, a * half_dir_rad) @ _axis_rotation(1, b * half_dir_rad)
                )
    return jnp.stack(mats)


_SHIFT_OFFSETS = np.array([(x, y) for y in (-1, 0, 1) for x in (-1, 0, 1)], np.float32)  # (9, 2)


@partial(jax.jit, static_argnames=("refine_passes",))
def search_particles(
    vol_ft: VolumeFT,
    images,
    ctfs,
    poses,
    pose_mask,
    n_ref_chunks,
    band: FourierBand,
    shifts_px,
    angular_step_deg,
    psi_step_deg,
    refine_passes: int = REFINE_PASSES,
):
    """Best pose and origin of a chunk of particles that share one candidate pose set.

    vol_ft: prepared reference (box N).  images: (b, N, N) float32 particle images.
    ctfs: (b, N, N) float32 CTFs on the unshifted grid (ones for no CTF correction).
    poses: (C, r_c, 3, 3) candidate pose matrices in reference chunks (gallery × psi, padded).
    pose_mask: (C, r_c) bool, False on padding.  n_ref_chunks: int scalar (traced) ≤ C — only the
    first n_ref_chunks chunks are searched, so one compiled program serves every region group.
    band: :func:`fourier_band`.  shifts_px: (S, 2) coarse shift candidates (:func:`shift_disc`).
    angular_step_deg, psi_step_deg: scalars, the gallery steps (set the refinement grid).
    refine_passes: static; 0 = coarse search only.
    Returns (rotmats (b, 3, 3), origins_px (b, 2) (x, y) RELION origin in px, score (b,) NCC).
    """
    b = images.shape[0]
    f = _band_values(band, jnp.fft.fft2(images.astype(jnp.float32))) * band.sqrt_weight  # (b, K)
    c = _band_values(band, ctfs.astype(jnp.float32))  # (b, K)
    inorm = jnp.sqrt(jnp.sum(jnp.abs(f) ** 2, axis=-1))  # (b,)
    cf = c * f
    c2 = c * c
    j = cf[:, None, :] * _phases(band, shifts_px)[None]  # (b, S, K)
    j = jnp.concatenate([j.real, j.imag], axis=-1)  # (b, S, 2K)
    n_shift = shifts_px.shape[0]
    r_c = poses.shape[1]

    def coarse_chunk(ci, carry):
        best, best_ref, best_shift = carry
        rw = _weighted_refs(vol_ft, band, poses[ci])  # (r_c, K)
        rr = jnp.concatenate([rw.real, rw.imag], axis=-1)  # (r_c, 2K)
        cc = jnp.einsum("bsq,rq->brs", j, rr)  # (b, r_c, S)
        rnorm = jnp.sqrt(c2 @ (jnp.abs(rw) ** 2).T)  # (b, r_c)
        ncc = cc / (inorm[:, None, None] * rnorm[:, :, None] + NORM_EPS)
        ncc = jnp.where(pose_mask[ci][None, :, None], ncc, -jnp.inf).reshape(b, -1)
        arg = jnp.argmax(ncc, axis=-1)
        score = jnp.take_along_axis(ncc, arg[:, None], axis=-1)[:, 0]
        better = score > best
        return (
            jnp.where(better, score, best),
            jnp.where(better, ci * r_c + arg // n_shift, best_ref),
            jnp.where(better, arg % n_shift, best_shift),
        )

    init = (jnp.full((b,), -jnp.inf), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))
    best, best_ref, best_shift = jax.lax.fori_loop(0, n_ref_chunks, coarse_chunk, init)
    rot = poses.reshape(-1, 3, 3)[best_ref]  # (b, 3, 3)
    origin = shifts_px[best_shift]  # (b, 2)

    for p in range(refine_passes):
        scale = 0.5 ** (p + 1)
        local = _local_rotations(jnp.deg2rad(angular_step_deg) * scale, jnp.deg2rad(psi_step_deg) * scale)
        cand = jnp.einsum("jik,bkl->bjil", local, rot)  # (b, 27, 3, 3)
        rw = _weighted_refs(vol_ft, band, cand.reshape(-1, 3, 3)).reshape(b, 27, -1)  # (b, 27, K)
        cand_shift = origin[:, None, :] + scale * _SHIFT_OFFSETS[None]  # (b, 9, 2)
        jj = cf[:, None, :] * _phases(band, cand_shift)  # (b, 9, K)
        cc = jnp.einsum("bqk,bjk->bjq", jj, jnp.conj(rw)).real  # (b, 27, 9)
        rnorm = jnp.sqrt(jnp.einsum("bk,bjk->bj", c2, jnp.abs(rw) ** 2))
        ncc = (cc / (inorm[:, None, None] * rnorm[:, :, None] + NORM_EPS)).reshape(b, -1)
        arg = jnp.argmax(ncc, axis=-1)
        best = jnp.take_along_axis(ncc, arg[:, None], axis=-1)[:, 0]
        rot = jnp.take_along_axis(cand, (arg // 9)[:, None, None, None], axis=1)[:, 0]
        origin = jnp.take_along_axis(cand_shift, (arg % 9)[:, None, None], axis=1)[:, 0]
    return rot, origin, best


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _ctf_chunk(ctf_params: Mapping | None, idx: np.ndarray, box: int, pixel_size_ang: float):
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


def align_particles(
    images,
    vol_ft: VolumeFT,
    candidate_regions,
    centres: np.ndarray,
    ops: np.ndarray,
    *,
    pixel_size_ang: float,
    angular_step_deg: float,
    psi_step_deg: float,
    margin_deg: float,
    max_shift_px: float,
    ctf_params: Mapping | None = None,
    refine: bool = True,
    lowpass_resolution_ang: float | None = None,
    memory_budget_gb: float = 4.0,
    exhaustive: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Align every particle inside its candidate regions (or the whole asymmetric unit).

    images: (n, N, N) float array-like (a memmap is read chunk by chunk).
    vol_ft: prepared reference map (``projector.prepare_volume``), same box and pixel as images.
    candidate_regions: (n, k) int region indices per particle (e.g. predict's top-k); ignored when
        exhaustive. Particles with the same region SET form a group that shares its references.
    centres: (R, 3) region centres.  ops: (G, 3, 3) symmetry operators.
    pixel_size_ang: Å/px.  angular_step_deg: gallery direction step.  psi_step_deg: in-plane step.
    margin_deg: gallery extends this far past the region borders.  max_shift_px: |origin| bound.
    ctf_params: None or a mapping with per-particle (n,) or scalar ``defocus_u_ang``,
        ``defocus_v_ang``, ``defocus_angle_deg``, ``voltage_kv``, ``cs_mm``, ``amplitude_contrast``
        (optional ``bfactor_ang2``, ``phase_shift_deg``).
    refine: run the REFINE_PASSES local passes.  lowpass_resolution_ang: band limit of the score.
    memory_budget_gb: bound on transient arrays (:func:`chunk_sizes`).
    exhaustive: search the union of all regions (no margin) with the same code.
    progress: called with the number of particles finished after every chunk.
    Returns dict of numpy arrays: eulers_deg (n, 3) RELION rot/tilt/psi, origins_px (n, 2) RELION
    (OriginX, OriginY) in px, score (n,) NCC, region (n,) region of the found direction.
    """
    n, box = len(images), vol_ft.box
    lattice = sphere_lattice(angular_step_deg)
    n_psi = len(psi_angles(psi_step_deg))
    if exhaustive:
        keys = np.zeros(n, int)
        galleries = [region_gallery_indices(lattice, centres, ops, range(len(centres)), 0.0)]
    else:
        sets = np.sort(np.asarray(candidate_regions, int).reshape(n, -1), axis=1)
        uniq, keys = np.unique(sets, axis=0, return_inverse=True)
        keys = keys.ravel()
        galleries = [region_gallery_indices(lattice, centres, ops, np.unique(u), margin_deg) for u in uniq]
    band = fourier_band(box, pixel_size_ang, lowpass_resolution_ang)
    shifts = shift_disc(max_shift_px)
    n_refs_max = max(len(g) for g in galleries) * n_psi
    b_chunk, r_chunk = chunk_sizes(box, int(band.flat_index.shape[0]), len(shifts), n_refs_max, memory_budget_gb)
    n_chunks_max = -(-n_refs_max // r_chunk)
    passes = REFINE_PASSES if refine else 0

    rotmats = np.zeros((n, 3, 3), np.float32)
    origins = np.zeros((n, 2), np.float32)
    scores = np.zeros(n, np.float32)
    done = 0
    for g, gallery in enumerate(galleries):
        members = np.flatnonzero(keys == g)
        if len(members) == 0:
            continue
        poses = gallery_poses(lattice[gallery], psi_step_deg)
        pad = n_chunks_max * r_chunk - len(poses)
        mask = np.concatenate([np.ones(len(poses), bool), np.zeros(pad, bool)]).reshape(n_chunks_max, r_chunk)
        poses = np.concatenate([poses, np.broadcast_to(np.eye(3, dtype=np.float32), (pad, 3, 3))])
        poses = jnp.asarray(poses.reshape(n_chunks_max, r_chunk, 3, 3))
        mask = jnp.asarray(mask)
        n_used = jnp.int32(-(-len(gallery) * n_psi // r_chunk))
        b_group = min(b_chunk, _power_of_two_at_least(len(members)))  # few compiled shapes, little padding
        for start in range(0, len(members), b_group):
            idx = members[start : start + b_group]
            fill = np.concatenate([idx, np.full(b_group - len(idx), idx[0])])  # static chunk shape
            imgs = jnp.asarray(np.stack([np.asarray(images[i], np.float32) for i in fill]))
            ctfs = _ctf_chunk(ctf_params, fill, box, pixel_size_ang)
            rot, org, sc = search_particles(
                vol_ft, imgs, ctfs, poses, mask, n_used, band, jnp.asarray(shifts),
                angular_step_deg, psi_step_deg, refine_passes=passes,
            )
            k = len(idx)
            rotmats[idx], origins[idx], scores[idx] = np.asarray(rot)[:k], np.asarray(org)[:k], np.asarray(sc)[:k]
            done += k
            if progress is not None:
                progress(done)
    region, _ = assign_regions(rotmats[:, 2, :].astype(float), centres, ops)
    return {
        "eulers_deg": matrix_to_euler(rotmats.astype(float)),
        "origins_px": origins,
        "score": scores,
        "region": region,
    }
