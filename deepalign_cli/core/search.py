"""Correlation-search kernels of `align` (and of `refine`'s local search): the jitted programs
that score particles against projections of a reference map over rot, tilt, psi and shifts, and
refine the best poses. ``core.alignment`` runs them over a whole particle stack.

Score: the normalised cross-correlation of `core.score` (its module docstring).

Shifts by one matrix product instead of one FFT per pair. For a fixed particle, the numerator at
every shift s of a disc (|s| ≤ max_shift) is a dot product between the reference vector
[Re R, Im R] and the vector J_s = CTF · I · e^{-2πi k·s/N}. Stacking the S shifted particle
vectors of a chunk of b particles gives a (b·S, 2K) matrix, and one GEMM with the (2K, r) reference
matrix scores every (particle, shift, reference) triple. Measured against one inverse FFT per
(particle, reference) pair on this CPU this is much faster (GEMMs run near peak, batched small FFTs
do not), it only evaluates the shifts of the max-shift disc, and with the band limit K ≈ π k_max²/2
instead of N². The CTF is real, so it is folded into the particle side and the references are
shared by every particle of a region group.

Refinement (``refine_passes`` > 0), coordinate-wise: pass p (scale 2^-p) fixes a 3 × 3 grid of
sub-pixel shifts ±scale px around the current origin, then for the image-frame x, y and z axes in
turn projects the two rotations ±h·scale about that axis (h = step for x, y; psi_step for z) and
keeps the best of (current, +, −) × 9 shifts. 6 projections per pass (18 in all, against 81 for a
full 3 × 3 × 3 grid); the current pose is always a candidate, so the score never decreases.

The coarse search loops over a dynamic range of reference chunks, so region groups of different
sizes share one compiled program; :func:`search_particles` chains the three jitted steps for one
chunk (projected references). :func:`_programs` gives the steps on one device, or ``shard_map``-ped
over a particle mesh (``core.devices``) on several. Also here: the gallery poses, the shift disc,
the psi angles and the chunk sizes of a memory budget (:func:`chunk_sizes`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import devices
from .geometry import direction_to_angles, euler_to_matrix
from .projector import VolumeFT
from .score import NORM_EPS, FourierBand, particle_features, phases, pose_scores, reference_table, weighted_refs

REFINE_PASSES = 3  # refinement passes; pass p searches ±step/2^p, ±psi_step/2^p, ±1/2^p px
BYTES_F32 = 4
MAX_PARTICLE_CHUNK = 256
# transient arrays of one reference/refinement projection, in units of one (N, N) complex64 image
PROJECTION_WORK_FACTOR = 6
MAX_REF_CHUNK = 512  # references per coarse chunk: GEMMs at full speed (measured 256–1024), little padding per region
COARSE_CHUNK = 32  # particles per coarse GEMM on CPU (b·S shifted particle rows); measured: benchmarks/RESULTS.md
COARSE_CHUNK_ACCEL = 256  # the same on accelerators; measured: benchmarks/RESULTS.md ("coarse GEMM size on the GPU")


def coarse_chunk() -> int:
    """Particles per coarse GEMM on this backend (`COARSE_CHUNK` on CPU, else `COARSE_CHUNK_ACCEL`)."""
    return COARSE_CHUNK if jax.default_backend() == "cpu" else COARSE_CHUNK_ACCEL


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
    MAX_PARTICLE_CHUNK and the reference chunk at min(n_refs, MAX_REF_CHUNK).
    """
    budget = memory_budget_gb * 2**30
    img = box * box * 8 * PROJECTION_WORK_FACTOR
    ref_chunk = int(max(1, min(n_refs, MAX_REF_CHUNK, budget / 4 / (img + 2 * n_coeffs * BYTES_F32))))
    per_particle = n_shifts * (2 * n_coeffs + ref_chunk) * BYTES_F32 + 27 * img
    particle_chunk = int(max(1, min(MAX_PARTICLE_CHUNK, budget / 2 / per_particle)))
    return particle_chunk, ref_chunk


def _axis_rotation(axis: int, angle_rad):
    """Right-handed rotation matrices (..., 3, 3) about coordinate axis 0/1/2 (x/y/z)."""
    angle_rad = jnp.asarray(angle_rad, jnp.float32)
    c, s = jnp.cos(angle_rad), jnp.sin(angle_rad)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    m = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), angle_rad.shape + (3, 3))
    return m.at[..., i, i].set(c).at[..., j, j].set(c).at[..., i, j].set(-s).at[..., j, i].set(s)


_SHIFT_OFFSETS = np.array([(x, y) for y in (-1, 0, 1) for x in (-1, 0, 1)], np.float32)  # (9, 2)


def _coarse(cf, c2, inorm, chunk_refs, pose_mask, first_chunk, n_ref_chunks, band, shifts_px):
    """Best (score, reference index, shift index) over the n_ref_chunks reference chunks that start
    at chunk first_chunk (the index counts rows from the first row of chunk 0).

    chunk_refs(ci) → ([Re, Im] (r_c, 2K), power (r_c, K)). The max over shifts is taken on the raw
    correlation (the normaliser does not depend on the shift), then normalised per reference."""
    b = cf.shape[0]
    j = cf[:, None, :] * phases(band, shifts_px)[None]  # (b, S, K)
    j = jnp.concatenate([j.real, j.imag], axis=-1).reshape(b * shifts_px.shape[0], -1)  # (b·S, 2K)
    r_c = pose_mask.shape[1]

    def body(i, carry):
        best, best_ref, best_shift = carry
        ci = first_chunk + i
        rr, power = chunk_refs(ci)
        cc = (j @ rr.T).reshape(b, -1, r_c)  # (b, S, r_c): one GEMM per chunk
        cmax, cs = jnp.max(cc, axis=1), jnp.argmax(cc, axis=1)  # (b, r_c)
        rnorm = jnp.sqrt(c2 @ power.T)  # (b, r_c)
        ncc = jnp.where(pose_mask[ci][None], cmax / (inorm[:, None] * rnorm + NORM_EPS), -jnp.inf)
        arg = jnp.argmax(ncc, axis=-1)
        score = jnp.take_along_axis(ncc, arg[:, None], axis=-1)[:, 0]
        better = score > best
        return (
            jnp.where(better, score, best),
            jnp.where(better, ci * r_c + arg, best_ref),
            jnp.where(better, jnp.take_along_axis(cs, arg[:, None], axis=-1)[:, 0], best_shift),
        )

    init = (jnp.full((b,), -jnp.inf), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))
    return jax.lax.fori_loop(0, n_ref_chunks, body, init)


@jax.jit
def coarse_search(cf, c2, inorm, refs, powers, pose_mask, first_chunk, n_ref_chunks, band: FourierBand, shifts_px):
    """Coarse search of particle features (:func:`particle_features`) against cached references.

    refs: (C, r_c, 2K), powers: (C, r_c, K) from :func:`reference_table`, in reference chunks.
    pose_mask: (C, r_c) bool (False on padding).  first_chunk, n_ref_chunks: traced ints, the
    chunks [first_chunk, first_chunk + n_ref_chunks) are searched (one region's block of the
    table). shifts_px: (S, 2). Returns (score (b,), reference index into the flattened chunks (b,),
    shift index (b,))."""
    return _coarse(cf, c2, inorm, lambda ci: (refs[ci], powers[ci]), pose_mask, first_chunk, n_ref_chunks, band, shifts_px)


@jax.jit
def coarse_search_projected(vol_ft: VolumeFT, cf, c2, inorm, poses, pose_mask, n_ref_chunks, band: FourierBand, shifts_px):
    """:func:`coarse_search` with the references projected chunk by chunk from poses (C, r_c, 3, 3)
    (constant memory; used when the reference table does not fit the memory budget)."""
    return _coarse(cf, c2, inorm, lambda ci: reference_table(vol_ft, band, poses[ci]), pose_mask, 0, n_ref_chunks, band, shifts_px)


@partial(jax.jit, static_argnames=("refine_passes",))
def refine_poses(vol_ft: VolumeFT, cf, c2, inorm, rotmats, origins_px, band: FourierBand,
                 angular_step_deg, psi_step_deg, refine_passes: int = REFINE_PASSES):
    """Local refinement of (rotmats (b, 3, 3), origins_px (b, 2)) — see the module docstring.

    Pass p (scale 2^-p): the 3 × 3 sub-pixel shift grid ±scale px is fixed for the pass; then, one
    axis after the other (image-frame x, y, then z), the rotations ±h·scale about that axis are
    projected (2 slices) and the best of (current, +, −) × 9 shifts is kept, h = angular_step for x
    and y and psi_step for z. The current pose is always a candidate, so the score never decreases.
    Returns (rotmats (b, 3, 3), origins_px (b, 2), score (b,)).
    """
    b = cf.shape[0]
    rot, origin = rotmats.astype(jnp.float32), origins_px.astype(jnp.float32)
    cur = weighted_refs(vol_ft, band, rot)  # (b, K)
    best = pose_scores(cf[:, None, :] * phases(band, origin)[:, None, :], cur[:, None], c2, inorm)[:, 0, 0]
    for p in range(refine_passes):
        scale = 0.5 ** (p + 1)
        cand_shift = origin[:, None, :] + scale * _SHIFT_OFFSETS[None]  # (b, 9, 2)
        jj = cf[:, None, :] * phases(band, cand_shift)  # (b, 9, K)
        for axis, step in ((0, angular_step_deg), (1, angular_step_deg), (2, psi_step_deg)):
            h = jnp.deg2rad(step) * scale
            local = _axis_rotation(axis, jnp.stack([h, -h]))  # (2, 3, 3)
            cand = jnp.einsum("jik,bkl->bjil", local, rot)  # (b, 2, 3, 3)
            rws = jnp.concatenate([cur[:, None], weighted_refs(vol_ft, band, cand.reshape(-1, 3, 3)).reshape(b, 2, -1)], axis=1)
            ncc = pose_scores(jj, rws, c2, inorm).reshape(b, -1)  # (b, 3·9), current pose first
            arg = jnp.argmax(ncc, axis=-1)
            best = jnp.take_along_axis(ncc, arg[:, None], axis=-1)[:, 0]
            a, q = arg // 9, arg % 9
            cands = jnp.concatenate([rot[:, None], cand], axis=1)
            rot = jnp.take_along_axis(cands, a[:, None, None, None], axis=1)[:, 0]
            cur = jnp.take_along_axis(rws, a[:, None, None], axis=1)[:, 0]
            origin = jnp.take_along_axis(cand_shift, q[:, None, None], axis=1)[:, 0]
    return rot, origin, best


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
    """Best pose and origin of a chunk of particles that share one candidate pose set, in one
    program (projected references, no table): :func:`particle_features`,
    :func:`coarse_search_projected` and :func:`refine_poses`. ``alignment.align_particles`` runs
    the same three steps separately so that the reference table and the refinement are shared.

    vol_ft: prepared reference (box N).  images: (b, N, N) float32 particle images.
    ctfs: (b, N, N) float32 CTFs on the unshifted grid (ones for no CTF correction).
    poses: (C, r_c, 3, 3) candidate pose matrices in reference chunks (gallery × psi, padded).
    pose_mask: (C, r_c) bool, False on padding.  n_ref_chunks: int scalar (traced) ≤ C.
    band: :func:`fourier_band`.  shifts_px: (S, 2) coarse shift candidates (:func:`shift_disc`).
    angular_step_deg, psi_step_deg: scalars, the gallery steps (set the refinement grid).
    refine_passes: static; 0 = coarse search only.
    Returns (rotmats (b, 3, 3), origins_px (b, 2) (x, y) RELION origin in px, score (b,) NCC).
    """
    cf, c2, inorm = particle_features(images, ctfs, band)
    best, best_ref, best_shift = coarse_search_projected(vol_ft, cf, c2, inorm, poses, pose_mask, n_ref_chunks, band, shifts_px)
    rot = poses.reshape(-1, 3, 3)[best_ref]
    origin = shifts_px[best_shift]
    if refine_passes == 0:
        return rot, origin, best
    return refine_poses(vol_ft, cf, c2, inorm, rot, origin, band, angular_step_deg, psi_step_deg, refine_passes=refine_passes)


def _binary_pieces(n: int, cap: int) -> list[int]:
    """Split n particles into pieces of power-of-two sizes ≤ cap (no padding; at most log2(cap)+1
    compiled shapes): 13 → [8, 4, 1]."""
    pieces = [cap] * (n // cap)
    rest = n % cap
    while rest:
        p = 1 << (rest.bit_length() - 1)
        pieces.append(p)
        rest -= p
    return pieces


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@jax.jit
def _take_particles(cf, c2, inorm, idx):
    """Rows idx of the three feature arrays, in one dispatch (eager indexing costs ~1 ms per
    primitive on XLA:CPU, several per gather)."""
    return cf[idx], c2[idx], inorm[idx]


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The jitted steps of ``alignment.align_particles``: the module-level functions on one device,
    their ``shard_map``-ped versions (particle / pose axis split over the mesh) on several."""

    features: Callable
    table: Callable
    coarse: Callable
    coarse_projected: Callable
    refine: Callable


@functools.lru_cache(maxsize=8)
def _programs(mesh, refine_passes: int) -> _Programs:
    refine = partial(refine_poses, refine_passes=refine_passes)
    if mesh is None:
        return _Programs(particle_features, reference_table, coarse_search, coarse_search_projected, refine)
    ax, r = devices.P(devices.PARTICLE_AXIS), devices.P()

    def spmd(f, in_specs):
        return jax.jit(devices.shard_map(f, mesh, in_specs=in_specs, out_specs=ax))

    return _Programs(
        features=spmd(particle_features, (ax, ax, r)),
        table=spmd(reference_table, (r, r, ax)),
        coarse=spmd(coarse_search, (ax, ax, ax, r, r, r, r, r, r, r)),
        coarse_projected=spmd(coarse_search_projected, (r, ax, ax, ax, r, r, r, r, r)),
        refine=spmd(refine, (r, ax, ax, ax, ax, ax, r, r, r)),
    )
