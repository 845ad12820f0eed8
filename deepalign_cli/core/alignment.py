"""Aligning a particle stack (`align`): search groups by candidate region, the pose table,
chunking under a memory budget, several devices, progress. The jitted kernels it runs (features,
coarse search, refinement) and the score they compute are in ``core.search``.

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

Particles are scored in power-of-two pieces of a group (no padded particles, at most
log2(coarse_chunk()) + 1 compiled coarse shapes) and refined in fixed-size chunks across groups.

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
import time
from collections.abc import Callable, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import devices
from .gallery import region_gallery_indices, region_gallery_masks, sphere_lattice
from .geometry import matrix_to_euler
from .projector import VolumeFT
from .regions import assign_regions
from .score import FourierBand, fourier_band, particle_ctfs
from .search import (BYTES_F32, MAX_REF_CHUNK, REFINE_PASSES, _binary_pieces, _power_of_two_at_least, _Programs,
                     _programs, _take_particles, chunk_sizes, coarse_chunk, gallery_poses, psi_angles, shift_disc)

# When the particles whose candidate regions are cheaper than the asymmetric unit are fewer than
# this fraction of a call's particles, they are searched over the unit with the others: their
# restricted search would project a table of every region's gallery and compile its own programs
# for a handful of particles, and the unit covers all their candidate directions
# (measured: benchmarks/RESULTS.md, "align's small-remainder rule").
RESTRICTED_MIN_FRACTION = 0.05
MAX_TABLE_CHUNK = 1024  # poses projected per reference-table call
FEATURE_CHUNK = 64  # particles per feature (FFT, CTF) call
REFINE_CHUNK = 64  # particles per refinement call


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
