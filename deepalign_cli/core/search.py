"""Restricted correlation search (`align`): rot, tilt, psi and shifts of every particle against
projections of a reference map, only inside the particle's candidate regions.

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

Search groups and references. Every candidate region is one search group: its gallery (the
region plus the margin) is searched once for all the particles that list that region among their
top-k, and each particle keeps its best pose over its k groups. (Grouping by region *set* instead,
as a first version did, made ~120 small groups on 42 regions with top-2 and spent more time
gathering each group's references than scoring its few particles.) Every (gallery direction, psi)
pair is projected directly with the Fourier-slice projector at (rot, tilt, psi)
(``projector.sample_slices`` on the K band frequencies only). Each group owns a contiguous block of
reference chunks (≤ MAX_REF_CHUNK rows, so a region wastes little on padding) in one pose table:
when the projected table fits in a quarter of the memory budget it is projected ONCE and every
group scores its block in place (no gather); otherwise the group's chunks are projected a window
at a time (a quarter of the budget) and each projected window scores all the particles of the
group in the current block before the next is projected. ``table_cache`` keeps the table across
calls (the chunks of one `align` run) so that it is projected once per run. Exhaustive mode uses the same table and the same programs, with one group (the
asymmetric unit).

Refinement (``refine_passes`` > 0), coordinate-wise: pass p (scale 2^-p) fixes a 3 × 3 grid of
sub-pixel shifts ±scale px around the current origin, then for the image-frame x, y and z axes in
turn projects the two rotations ±h·scale about that axis (h = step for x, y; psi_step for z) and
keeps the best of (current, +, −) × 9 shifts. 6 projections per pass (18 in all, against 81 for a
full 3 × 3 × 3 grid); the current pose is always a candidate, so the score never decreases.

Particles are scored in power-of-two pieces of a group (no padded particles, at most
log2(coarse_chunk()) + 1 compiled coarse shapes) and refined in fixed-size chunks across groups.

The coarse search loops over a dynamic range of reference chunks, so region groups of different
sizes share one compiled program; :func:`search_particles` chains the three jitted steps for one
chunk (projected references).

Several devices (``core.devices``). When ``jax.devices()`` has D > 1 devices, ``align_particles``
splits the particle axis of every chunk it scores over a 1-D mesh named "particles": the feature,
coarse and refinement chunks hold D times as many particles (so each device gets the
single-device chunk size), every piece is padded to a multiple of D with copies of its first
particle (their results are dropped), and each device runs the single-device program on its slice
(``shard_map``, no collectives). The map, the band, the shift disc and the reference table are
replicated on every device; the table itself is projected with its pose axis split over the
devices. A particle's pose does not depend on D. With one device the single-device path runs
unchanged. The memory budget applies per device.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import devices
from .gallery import region_gallery_indices, region_gallery_masks, sphere_lattice
from .geometry import direction_to_angles, euler_to_matrix, matrix_to_euler
from .projector import VolumeFT
from .score import (NORM_EPS, FourierBand, fourier_band, particle_ctfs, particle_features, phases,
                    pose_scores, reference_table, weighted_refs)
from .regions import assign_regions

REFINE_PASSES = 3  # refinement passes; pass p searches ±step/2^p, ±psi_step/2^p, ±1/2^p px
BYTES_F32 = 4
MAX_PARTICLE_CHUNK = 256
# When the particles whose candidate regions are cheaper than the asymmetric unit are fewer than
# this fraction of a call's particles, they are searched over the unit with the others: their
# restricted search would project a table of every region's gallery and compile its own programs
# for a handful of particles, and the unit covers all their candidate directions
# (measured: benchmarks/RESULTS.md, "align's small-remainder rule").
RESTRICTED_MIN_FRACTION = 0.05
# transient arrays of one reference/refinement projection, in units of one (N, N) complex64 image
PROJECTION_WORK_FACTOR = 6
MAX_TABLE_CHUNK = 1024  # poses projected per reference-table call
FEATURE_CHUNK = 64  # particles per feature (FFT, CTF) call
REFINE_CHUNK = 64  # particles per refinement call
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
    :func:`coarse_search_projected` and :func:`refine_poses`. ``align_particles`` runs the same
    three steps separately so that the reference table and the refinement are shared.

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
    """The jitted steps of ``align_particles``: the module-level functions on one device, their
    ``shard_map``-ped versions (particle / pose axis split over the mesh) on several."""

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


def _search_groups(n: int, candidate_regions, exhaustive: bool, lattice, centres, ops, margin_deg: float, all_regions: bool = False):
    """(galleries, members): one search group per candidate region (its gallery: lattice indices
    of the region plus the margin; its members: the particles that have the region among their
    candidates; every region when all_regions, so that the layout does not depend on the
    particles), or one group (the asymmetric unit, every particle) when exhaustive."""
    if exhaustive:
        return [region_gallery_indices(lattice, centres, ops, range(len(centres)), 0.0)], [np.arange(n)]
    cand = np.asarray(candidate_regions, int).reshape(n, -1)
    used = np.arange(len(centres)) if all_regions else np.unique(cand)
    masks = region_gallery_masks(lattice, centres, ops, used, margin_deg)  # (len(used), L)
    return [np.flatnonzero(m) for m in masks], [np.flatnonzero((cand == r).any(axis=1)) for r in used]


def wide_candidate_particles(candidate_regions, n: int, lattice, centres, ops, margin_deg: float,
                             n_psi: int = 1, row_chunk: int = 1) -> np.ndarray:
    """(n,) bool: the particles whose candidate galleries (regions plus margins) cost at least as
    much as the whole asymmetric unit. Searching the asymmetric unit is then no more work and
    covers every candidate direction (e.g. a cumulative-probability rule that keeps many regions,
    or a coarse step whose margin is wide against the regions).

    Cost = reference rows scored: directions × n_psi, each gallery padded to whole chunks of
    row_chunk rows (what the coarse search computes; 1 = directions alone)."""
    cand = np.asarray(candidate_regions, int).reshape(n, -1)
    r = len(centres)
    rows = region_gallery_masks(lattice, centres, ops, range(r), margin_deg).sum(axis=1) * n_psi
    whole = len(region_gallery_indices(lattice, centres, ops, range(r), 0.0)) * n_psi

    def padded(m, cap):
        chunk = max(1, min(row_chunk, cap))
        return -(-m // chunk) * chunk

    member = np.zeros((n, r), bool)  # each region counted once per particle; -1 (no region) ignored
    ii, jj = np.nonzero((cand >= 0) & (cand < r))
    member[ii, cand[ii, jj]] = True
    return member.astype(np.int64) @ padded(rows, int(rows.max())) >= padded(whole, whole)


class _Rows:
    """The particles idx of an image array, read on access (a memmap stays on disk)."""

    def __init__(self, images, idx: np.ndarray):
        self.images, self.idx = images, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        return self.images[int(self.idx[i])]


def _subset_ctf(ctf_params: Mapping | None, idx: np.ndarray) -> Mapping | None:
    if ctf_params is None:
        return None
    return {k: (np.asarray(v)[idx] if np.ndim(v) else v) for k, v in ctf_params.items()}


def _align_split(images, vol_ft, candidate_regions, centres, ops, wide, *, ctf_params, progress, **opts) -> dict:
    """align_particles with the `wide` particles searched over the whole asymmetric unit and the
    others inside their candidate regions; results merged in the input order."""
    n = len(images)
    cand = np.asarray(candidate_regions, int).reshape(n, -1)
    out = {"eulers_deg": np.zeros((n, 3)), "origins_px": np.zeros((n, 2), np.float32), "score": np.zeros(n, np.float32),
           "region": np.zeros(n, int), "whole_unit": wide,
           "seconds": {"project": 0.0, "features": 0.0, "coarse": 0.0, "refine": 0.0}}
    done = 0
    for sel, whole in ((np.flatnonzero(~wide), False), (np.flatnonzero(wide), True)):
        if len(sel) == 0:
            continue
        tick = None if progress is None else (lambda k, base=done: progress(base + k))
        part = align_particles(_Rows(images, sel), vol_ft, cand[sel], centres, ops, **opts,
                               ctf_params=_subset_ctf(ctf_params, sel), exhaustive=whole, progress=tick)
        for key in ("eulers_deg", "origins_px", "score", "region"):
            out[key][sel] = part[key]
        for key, sec in part["seconds"].items():
            out["seconds"][key] += sec
        done += len(sel)
    return out


@dataclasses.dataclass(frozen=True)
class _Context:
    """The constants of one :func:`align_particles` call, placed on its devices: the particle mesh
    (None on one device) and its programs; the map, the band and the shift disc replicated."""

    mesh: object
    n_dev: int
    prog: _Programs
    vol_ft: VolumeFT
    band: FourierBand
    n_coeffs: int
    shifts: np.ndarray  # (S, 2) float32 (x, y) px, host copy
    shifts_j: jax.Array  # the same on the devices

    def rep(self, tree):
        return devices.replicate(tree, self.mesh)

    def shard(self, tree):
        return devices.shard_leading(tree, self.mesh, devices.PARTICLE_AXIS)


def _context(vol_ft: VolumeFT, pixel_size_ang: float, lowpass_resolution_ang: float | None, max_shift_px: float,
             refine_passes: int) -> _Context:
    mesh = devices.particle_mesh()  # None on one device: the single-device path, unchanged
    band = fourier_band(vol_ft.box, pixel_size_ang, lowpass_resolution_ang)
    shifts = shift_disc(max_shift_px)
    rep = partial(devices.replicate, mesh=mesh)
    return _Context(mesh, devices.mesh_size(mesh), _programs(mesh, refine_passes), rep(vol_ft), rep(band),
                    int(band.flat_index.shape[0]), shifts, rep(jnp.asarray(shifts)))


@dataclasses.dataclass(frozen=True)
class _PoseTable:
    """Step 1, the references of every search group in one table of chunks of r_chunk rows: group g
    owns chunks [first[g], first[g] + n_chunks[g]). poses: (rows, 3, 3) float32, identity on the
    padding; valid: (rows,) bool, False on the padding; mask: valid as (chunks, r_chunk), replicated."""

    poses: np.ndarray
    valid: np.ndarray
    mask: jax.Array
    first: np.ndarray
    n_chunks: np.ndarray
    r_chunk: int


def _pose_table(ctx: _Context, galleries, lattice, psi_step_deg: float, r_chunk: int) -> _PoseTable:
    """Every (gallery direction, psi) pose of each group (gallery: lattice indices) in its block of chunks."""
    n_psi = len(psi_angles(psi_step_deg))
    n_chunks = np.array([-(-len(g) * n_psi // r_chunk) for g in galleries])
    first = np.concatenate([[0], np.cumsum(n_chunks)[:-1]]).astype(int)
    total_rows = int(n_chunks.sum()) * r_chunk
    poses = np.broadcast_to(np.eye(3, dtype=np.float32), (total_rows, 3, 3)).copy()
    valid = np.zeros(total_rows, bool)
    for g, gal in enumerate(galleries):
        p = gallery_poses(lattice[gal], psi_step_deg)
        poses[first[g] * r_chunk : first[g] * r_chunk + len(p)] = p
        valid[first[g] * r_chunk : first[g] * r_chunk + len(p)] = True
    return _PoseTable(poses, valid, ctx.rep(jnp.asarray(valid.reshape(-1, r_chunk))), first, n_chunks, r_chunk)


@dataclasses.dataclass(frozen=True)
class _Chunking:
    """How one call splits its work. block: particles whose features are held at once (a quarter
    of the budget); features, refine: particles per feature / refinement call; coarse: largest
    coarse piece; window: reference chunks projected at a time when the table is not held;
    table_held: the projected table fits in a quarter of the budget (projected once). With D
    devices every particle chunk holds D× the single-device chunk (a multiple of D)."""

    block: int
    features: int
    coarse: int
    refine: int
    window: int
    table_held: bool


def _chunking(n: int, ctx: _Context, table: _PoseTable, b_chunk: int, memory_budget_gb: float) -> _Chunking:
    budget = memory_budget_gb * 2**30
    box, n_coeffs, n_dev = ctx.vol_ft.box, ctx.n_coeffs, ctx.n_dev
    return _Chunking(
        block=int(max(b_chunk, budget / 4 // (3 * n_coeffs * BYTES_F32 + box * box * BYTES_F32))),
        features=devices.pad_to_multiple(min(FEATURE_CHUNK * n_dev, _power_of_two_at_least(n)), n_dev),
        coarse=min(b_chunk, coarse_chunk()) * n_dev,
        refine=devices.pad_to_multiple(min(REFINE_CHUNK * n_dev, b_chunk * n_dev, _power_of_two_at_least(n)), n_dev),
        window=int(max(1, min(table.n_chunks.max(), budget / 4 // (table.r_chunk * 3 * n_coeffs * BYTES_F32)))),
        table_held=len(table.valid) * 3 * n_coeffs * BYTES_F32 <= budget / 4,
    )


class _Clock:
    """Wall time of each step: ``lap(step, *arrays)`` waits for the arrays, then adds the time
    since the previous lap to that step."""

    def __init__(self):
        self.seconds = {"project": 0.0, "features": 0.0, "coarse": 0.0, "refine": 0.0}
        self._tick = time.perf_counter()

    def lap(self, step: str, *wait) -> None:
        jax.block_until_ready(wait)
        now = time.perf_counter()
        self.seconds[step] += now - self._tick
        self._tick = now


class _Reporter:
    """Calls `progress` (if any) with the whole number of particles done, only when it grows."""

    def __init__(self, progress: Callable[[int], None] | None):
        self.progress, self.reported = progress, 0

    def __call__(self, done: float) -> None:
        if self.progress is not None and int(done) > self.reported:
            self.reported = int(done)
            self.progress(self.reported)


def _project_poses(ctx: _Context, poses: np.ndarray):
    """(refs (m, 2K), powers (m, K)) of poses (m, 3, 3), projected MAX_TABLE_CHUNK poses per call."""
    tab_chunk = devices.pad_to_multiple(MAX_TABLE_CHUNK, ctx.n_dev)  # projection calls: larger is faster
    pad = -len(poses) % tab_chunk
    poses = np.concatenate([poses, np.broadcast_to(np.eye(3, dtype=np.float32), (pad, 3, 3))])
    # each part replicated before any eager concatenate/slice: an eager op on a sharded array
    # compiles to an all-gather, which can deadlock XLA:CPU's forced host devices on few cores
    parts = [tuple(ctx.rep(q) for q in ctx.prog.table(ctx.vol_ft, ctx.band, ctx.shard(jnp.asarray(poses[s : s + tab_chunk]))))
             for s in range(0, len(poses), tab_chunk)]
    m = len(poses) - pad
    return jnp.concatenate([q[0] for q in parts])[:m], jnp.concatenate([q[1] for q in parts])[:m]


def _project_table(ctx: _Context, table: _PoseTable, group_rows):
    """The whole projected table: (refs (C, r_c, 2K), powers (C, r_c, K)), replicated. Only the
    group_rows[g] real poses of each group are projected; its padding rows stay zero."""
    parts = []
    for g, m in enumerate(group_rows):
        start = table.first[g] * table.r_chunk
        refs, powers = _project_poses(ctx, table.poses[start : start + m])
        pad = table.n_chunks[g] * table.r_chunk - m
        parts.append((jnp.pad(refs, ((0, pad), (0, 0))), jnp.pad(powers, ((0, pad), (0, 0)))))
    return (ctx.rep(jnp.concatenate([q[0] for q in parts]).reshape(-1, table.r_chunk, 2 * ctx.n_coeffs)),
            ctx.rep(jnp.concatenate([q[1] for q in parts]).reshape(-1, table.r_chunk, ctx.n_coeffs)))


def _held_table(ctx: _Context, table: _PoseTable, group_rows, cache_key, table_cache: dict | None, vol_in, clock: _Clock):
    """The projected table (:func:`_project_table`), taken from table_cache when it holds cache_key,
    else projected and (with a cache) stored in it with the caller's map object `vol_in`."""
    if table_cache is not None and cache_key in table_cache:
        return table_cache[cache_key][1:]
    refs, powers = _project_table(ctx, table, group_rows)
    clock.lap("project", refs, powers)
    if table_cache is not None:
        while len(table_cache) >= 2:  # the two latest tables (a run's restricted and whole-unit ones)
            table_cache.pop(next(iter(table_cache)))
        table_cache[cache_key] = (vol_in, refs, powers)  # holding vol_in keeps its id unique
    return refs, powers


def _block_features(ctx: _Context, images, ids: np.ndarray, feat_chunk: int, ctf_params: Mapping | None, pixel_size_ang: float):
    """Step 2: :func:`particle_features` of the particles ids (cf, c2, inorm), computed feat_chunk
    particles per call and replicated on every device (by copies, not collectives), so that any
    group's rows are gathered locally."""
    feats = []
    for s in range(0, len(ids), feat_chunk):
        idx = ids[s : s + feat_chunk]
        fill = np.concatenate([idx, np.full(feat_chunk - len(idx), idx[0])])
        imgs = jnp.asarray(np.stack([np.asarray(images[i], np.float32) for i in fill]))
        out = ctx.prog.features(ctx.shard(imgs), ctx.shard(particle_ctfs(ctf_params, fill, ctx.vol_ft.box, pixel_size_ang)), ctx.band)
        feats.append(tuple(ctx.rep(q) for q in out))
    return tuple(jnp.concatenate([f[i] for f in feats])[: len(ids)] for i in range(3))


class _BestPoses:
    """Step 3's bookkeeping: for each particle of a block, its best coarse (score, pose-table row,
    shift index) over all the groups it belongs to."""

    def __init__(self, n: int):
        self.score = np.full(n, -np.inf, np.float32)
        self.row = np.zeros(n, np.int64)
        self.shift = np.zeros(n, np.int64)

    def keep(self, idx: np.ndarray, score, row, shift) -> None:
        """Results of the particles idx (a program's padded outputs: the first len(idx) count)."""
        k = len(idx)
        score, row, shift = np.asarray(score)[:k], np.asarray(row)[:k], np.asarray(shift)[:k]
        better = score > self.score[idx]
        self.score[idx[better]], self.row[idx[better]], self.shift[idx[better]] = score[better], row[better], shift[better]


def _pieces(ctx: _Context, feats, members: np.ndarray, cap: int):
    """(indices, sharded features) of `members` in power-of-two pieces ≤ cap (few compiled shapes),
    each padded to a multiple of the devices with copies of its first particle."""
    start = 0
    for size in _binary_pieces(len(members), cap):
        idx = members[start : start + size]
        start += size
        ij = np.asarray(devices.pad_indices(idx, devices.pad_to_multiple(size, ctx.n_dev)), np.int32)
        yield idx, tuple(ctx.shard(a) for a in _take_particles(*feats, ij))


def _coarse_in_table(ctx: _Context, feats, members, cap: int, table: _PoseTable, refs, powers, g: int, best: _BestPoses):
    """Group g against the held table: one call per piece scores the group's whole block of chunks.
    Yields the work of each piece (particles × reference chunks)."""
    f0, nc = ctx.rep(jnp.int32(table.first[g])), ctx.rep(jnp.int32(table.n_chunks[g]))
    for idx, (cf, c2, inorm) in _pieces(ctx, feats, members, cap):
        best.keep(idx, *ctx.prog.coarse(cf, c2, inorm, refs, powers, table.mask, f0, nc, ctx.band, ctx.shifts_j))
        yield len(idx) * table.n_chunks[g]


def _coarse_in_windows(ctx: _Context, feats, members, cap: int, table: _PoseTable, window: int, g: int, best: _BestPoses,
                       clock: _Clock):
    """Group g without the held table: its chunks are projected `window` at a time and each window
    scores every piece of the group before the next is projected. Yields the work of each piece."""
    r_chunk, zero = table.r_chunk, ctx.rep(jnp.int32(0))
    end = table.first[g] + table.n_chunks[g]
    for w0 in range(table.first[g], end, window):
        w1 = min(w0 + window, end)
        clock.lap("coarse")
        refs, powers = _project_poses(ctx, table.poses[w0 * r_chunk : w1 * r_chunk])
        pad = (window - (w1 - w0)) * r_chunk  # a fixed window shape: one compiled program
        refs = ctx.rep(jnp.pad(refs, ((0, pad), (0, 0))).reshape(window, r_chunk, -1))
        powers = ctx.rep(jnp.pad(powers, ((0, pad), (0, 0))).reshape(window, r_chunk, -1))
        cmask = np.zeros((window, r_chunk), bool)
        cmask[: w1 - w0] = table.valid[w0 * r_chunk : w1 * r_chunk].reshape(-1, r_chunk)
        cmask, n_w = ctx.rep(jnp.asarray(cmask)), ctx.rep(jnp.int32(w1 - w0))
        clock.lap("project", refs, powers)
        for idx, (cf, c2, inorm) in _pieces(ctx, feats, members, cap):
            sc, row, sh = ctx.prog.coarse(cf, c2, inorm, refs, powers, cmask, zero, n_w, ctx.band, ctx.shifts_j)
            best.keep(idx, sc, np.asarray(row) + w0 * r_chunk, sh)
            yield len(idx) * (w1 - w0)


def _coarse_block(ctx: _Context, feats, group_members, table: _PoseTable, held, chunking: _Chunking, clock: _Clock,
                  report: Callable[[float], None]) -> _BestPoses:
    """Step 3: every group's members of a block (group_members[g]: positions in the block) against
    the group's references (`held`: the projected table, or None to project windows); each particle
    keeps its best pose over its groups. report(x): x of the block's particles are done (the coarse
    search counts for 90 % of a block)."""
    best = _BestPoses(len(feats[0]))
    work_total = max(1, sum(len(m) * c for m, c in zip(group_members, table.n_chunks)))
    work_done = 0
    for g, members in enumerate(group_members):
        if len(members) == 0:
            continue
        if held is not None:
            steps = _coarse_in_table(ctx, feats, members, chunking.coarse, table, *held, g, best)
        else:
            steps = _coarse_in_windows(ctx, feats, members, chunking.coarse, table, chunking.window, g, best, clock)
        for work in steps:
            work_done += work
            report(0.9 * len(best.score) * work_done / work_total)
    return best


def _refine_block(ctx: _Context, feats, ids: np.ndarray, rotmats, origins, scores, chunk: int, refine_passes: int,
                  angular_step_deg: float, psi_step_deg: float, report: Callable[[int], None]) -> None:
    """Step 4: the block's coarse poses (rows ids of rotmats, origins, scores, updated in place)
    refined in fixed chunks; report(k) after each chunk: the block's first k particles are done."""
    for s in range(0, len(ids), chunk):
        idx = np.arange(s, min(len(ids), s + chunk))
        if refine_passes:
            fill = np.concatenate([idx, np.full(chunk - len(idx), idx[0])])
            gi = ids[fill]
            cf, c2, inorm = (ctx.shard(a) for a in _take_particles(*feats, fill.astype(np.int32)))
            rot, org, sc = ctx.prog.refine(
                ctx.vol_ft, cf, c2, inorm, ctx.shard(jnp.asarray(rotmats[gi])),
                ctx.shard(jnp.asarray(origins[gi])), ctx.band, angular_step_deg, psi_step_deg,
            )
            k = len(idx)
            rotmats[ids[idx]], origins[ids[idx]], scores[ids[idx]] = np.asarray(rot)[:k], np.asarray(org)[:k], np.asarray(sc)[:k]
        report(idx[-1] + 1)


def _wide_particles(candidate_regions, n: int, centres, ops, *, pixel_size_ang, angular_step_deg, psi_step_deg, margin_deg,
                    max_shift_px, lowpass_resolution_ang, memory_budget_gb, box: int) -> np.ndarray:
    """(n,) bool: the particles to search over the whole asymmetric unit (:func:`wide_candidate_particles`,
    all of them when the others are fewer than RESTRICTED_MIN_FRACTION of n)."""
    n_coeffs = int(fourier_band(box, pixel_size_ang, lowpass_resolution_ang).flat_index.shape[0])
    row_chunk = chunk_sizes(box, n_coeffs, len(shift_disc(max_shift_px)), MAX_REF_CHUNK, memory_budget_gb)[1]
    wide = wide_candidate_particles(candidate_regions, n, sphere_lattice(angular_step_deg), centres, ops, margin_deg,
                                    len(psi_angles(psi_step_deg)), row_chunk)
    if wide.any() and (~wide).sum() < RESTRICTED_MIN_FRACTION * n:
        wide[:] = True  # a handful left: the unit is a superset of their candidates (RESTRICTED_MIN_FRACTION)
    return wide


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
    table_cache: dict | None = None,
) -> dict:
    """Align every particle inside its candidate regions (or the whole asymmetric unit).

    images: (n, N, N) float array-like (a memmap is read block by block).
    vol_ft: prepared reference map (``projector.prepare_volume``), same box and pixel as images.
    candidate_regions: (n, k) int region indices per particle (e.g. predict's top-k); ignored when
        exhaustive. Every candidate region is one search group: its references are shared by all
        the particles that list it, and a particle keeps the best pose over its k regions. A
        particle whose candidate galleries cost at least as much as the asymmetric unit is searched
        over the asymmetric unit instead (``wide_candidate_particles``): a superset, for no more work;
        when such particles are all but ``RESTRICTED_MIN_FRACTION`` of the call's, all are.
    centres: (R, 3) region centres.  ops: (G, 3, 3) symmetry operators.
    pixel_size_ang: Å/px.  angular_step_deg: gallery direction step.  psi_step_deg: in-plane step.
    margin_deg: gallery extends this far past the region borders.  max_shift_px: |origin| bound.
    ctf_params: None or a mapping with per-particle (n,) or scalar ``defocus_u_ang``,
        ``defocus_v_ang``, ``defocus_angle_deg``, ``voltage_kv``, ``cs_mm``, ``amplitude_contrast``
        (optional ``bfactor_ang2``, ``phase_shift_deg``).
    refine: run the REFINE_PASSES local passes.  lowpass_resolution_ang: band limit of the score.
    memory_budget_gb: bound on the reference table and transient arrays (:func:`chunk_sizes`).
    exhaustive: search the union of all regions (no margin) with the same code.
    progress: called with the (estimated, non-decreasing) number of particles finished.
    table_cache: a dict kept by the caller across calls with the same map and settings (e.g. the
        chunks of one `align` run): the projected reference table is stored in it and reused, so
        it is projected once per run instead of once per call. With a cache the restricted table
        holds every region (its layout must not depend on a chunk's particles).
    Returns dict of numpy arrays: eulers_deg (n, 3) RELION rot/tilt/psi, origins_px (n, 2) RELION
    (OriginX, OriginY) in px, score (n,) NCC, region (n,) region of the found direction,
    whole_unit (n,) bool searched over the whole asymmetric unit; and
    "seconds": {"project", "features", "coarse", "refine"} wall time of each step (the reference
    projection is a one-time cost per call; the others grow with the number of particles).

    Steps (module docstring): (1) every group's poses get a contiguous block of reference chunks
    in one pose table (``_pose_table``); when the projected table fits in a quarter of the budget
    it is projected ONCE (``_held_table``), otherwise each chunk is projected once per particle
    block; then, block by block, (2) particle features (FFT, CTF) are computed in fixed chunks
    (``_block_features``); (3) for each group, its particles are scored against its block of
    chunks in power-of-two pieces (no padding) and each particle keeps its best pose over its
    groups (``_coarse_block``, ``_BestPoses``); (4) the coarse poses are refined in fixed-size
    chunks (``_refine_block``).
    """
    opts = dict(pixel_size_ang=pixel_size_ang, angular_step_deg=angular_step_deg, psi_step_deg=psi_step_deg,
                margin_deg=margin_deg, max_shift_px=max_shift_px, lowpass_resolution_ang=lowpass_resolution_ang,
                memory_budget_gb=memory_budget_gb)
    if not exhaustive:  # particles whose candidates cost more than the asymmetric unit: search it whole
        wide = _wide_particles(candidate_regions, len(images), centres, ops, **opts, box=vol_ft.box)
        if wide.any():
            return _align_split(images, vol_ft, candidate_regions, centres, ops, wide, ctf_params=ctf_params, progress=progress,
                                refine=refine, table_cache=table_cache, **opts)
    return _align_groups(images, vol_ft, candidate_regions, centres, ops, ctf_params=ctf_params, refine=refine,
                         exhaustive=exhaustive, progress=progress, table_cache=table_cache, **opts)


def _align_groups(images, vol_ft: VolumeFT, candidate_regions, centres, ops, *, pixel_size_ang, angular_step_deg, psi_step_deg,
                  margin_deg, max_shift_px, ctf_params, refine, lowpass_resolution_ang, memory_budget_gb, exhaustive, progress,
                  table_cache) -> dict:
    """:func:`align_particles` once every particle searches either its candidate regions or (all,
    exhaustive) the asymmetric unit: steps (1)–(4) of its docstring, block by block."""
    n, box = len(images), vol_ft.box
    passes = REFINE_PASSES if refine else 0
    ctx = _context(vol_ft, pixel_size_ang, lowpass_resolution_ang, max_shift_px, passes)
    lattice = sphere_lattice(angular_step_deg)
    n_psi = len(psi_angles(psi_step_deg))
    galleries, members = _search_groups(n, candidate_regions, exhaustive, lattice, centres, ops, margin_deg,
                                        all_regions=table_cache is not None)
    b_chunk, r_chunk = chunk_sizes(box, ctx.n_coeffs, len(ctx.shifts), max(len(g) for g in galleries) * n_psi, memory_budget_gb)
    table = _pose_table(ctx, galleries, lattice, psi_step_deg, r_chunk)
    chunking = _chunking(n, ctx, table, b_chunk, memory_budget_gb)
    clock = _Clock()
    held = None
    if chunking.table_held:
        cache_key = (id(vol_ft), box, float(pixel_size_ang), lowpass_resolution_ang, float(angular_step_deg), float(psi_step_deg),
                     float(margin_deg), bool(exhaustive), len(centres), r_chunk, ctx.n_dev)
        held = _held_table(ctx, table, [len(g) * n_psi for g in galleries], cache_key, table_cache, vol_ft, clock)
    member_of = np.zeros((len(galleries), n), bool)
    for g, m in enumerate(members):
        member_of[g, m] = True

    rotmats = np.zeros((n, 3, 3), np.float32)
    origins = np.zeros((n, 2), np.float32)
    scores = np.zeros(n, np.float32)
    report = _Reporter(progress)
    for b0 in range(0, n, chunking.block):
        ids = np.arange(b0, min(n, b0 + chunking.block))
        feats = _block_features(ctx, images, ids, chunking.features, ctf_params, pixel_size_ang)
        clock.lap("features", *feats)
        best = _coarse_block(ctx, feats, [np.flatnonzero(member_of[g, ids]) for g in range(len(galleries))], table, held,
                             chunking, clock, lambda x: report(b0 + x))
        rotmats[ids], origins[ids], scores[ids] = table.poses[best.row], ctx.shifts[best.shift], best.score
        clock.lap("coarse")
        _refine_block(ctx, feats, ids, rotmats, origins, scores, chunking.refine, passes, angular_step_deg, psi_step_deg,
                      lambda k: report(b0 + 0.9 * len(ids) + 0.1 * k))
        clock.lap("refine")
        report(b0 + len(ids))
    region, _ = assign_regions(rotmats[:, 2, :].astype(float), centres, ops)
    return {
        "eulers_deg": matrix_to_euler(rotmats.astype(float)),
        "origins_px": origins,
        "score": scores,
        "region": region,
        "whole_unit": np.full(n, bool(exhaustive)),
        "seconds": clock.seconds,
    }
