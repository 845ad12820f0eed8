"""Regions of projection directions: the paper's split of the sphere (Fig. 2).

Region centres are the vertices of a geodesic icosahedron: each of the 20 faces is subdivided
with frequency ``f`` and the points are pushed onto the sphere, giving ``10 f² + 2`` centres.
Neighbouring centres are ≈ 63.4°/f apart, so the requested spacing picks ``f = round(63.4/spacing)``:
30° → f = 2 → 42 regions, 20° → f = 3 → 92 regions (the paper's counts).

With symmetry, only the centres inside one asymmetric unit are kept. The asymmetric unit is the
Dirichlet cell of a fixed generic direction ``p0`` (no symmetry axis passes through it): the
directions d that are at least as close to p0 as any symmetry copy R d. Centres on a cell border
are kept once (a centre equivalent to an already kept one is dropped). Every direction is assigned
to the kept centre nearest to it *over all its symmetry copies*, so the regions are the Voronoi
cells of the kept centres on the quotient sphere: they never overlap and cover every direction.

Counts (tested): C1 30° → 42, C1 20° → 92, D7 20° → 7 (the paper reports 9 of 92 for its D7 case,
with Xmipp's asymmetric-unit rule; 92/14 ≈ 6.6 is the area bound), I1 20° → 2 (I1 30° → 1).
"""

from __future__ import annotations

import numpy as np

_ICOSA_EDGE_DEG = float(np.rad2deg(np.arccos(1 / np.sqrt(5))))  # 63.43°
# a direction fixed by no operator of any supported group (tilt 37°, rot 17°)
_P0 = np.array([np.cos(np.deg2rad(17)) * np.sin(np.deg2rad(37)), np.sin(np.deg2rad(17)) * np.sin(np.deg2rad(37)), np.cos(np.deg2rad(37))])


def _icosahedron():
    t = (1 + 5**0.5) / 2
    v = np.array(
        [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
         [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], dtype=float)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    faces = np.array(
        [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
         [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
         [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    return v, faces


def subdivision_frequency(spacing_deg: float) -> int:
    """Icosahedron subdivision frequency whose neighbour spacing is closest to spacing_deg."""
    return max(1, int(round(_ICOSA_EDGE_DEG / float(spacing_deg))))


def icosahedral_directions(frequency: int) -> np.ndarray:
    """Vertices (10 f² + 2, 3) of the frequency-f geodesic icosahedron, unit vectors, deterministic order
    (sorted by tilt, then rot)."""
    v, faces = _icosahedron()
    pts = []
    f = int(frequency)
    for a, b, c in faces:
        for i in range(f + 1):
            for j in range(f + 1 - i):
                k = f - i - j
                p = (i * v[a] + j * v[b] + k * v[c]) / f
                pts.append(p / np.linalg.norm(p))
    pts = np.array(pts)
    # deduplicate shared edge/vertex points
    keys = np.round(pts, 6)
    _, idx = np.unique(keys, axis=0, return_index=True)
    pts = pts[np.sort(idx)]
    tilt = np.round(np.rad2deg(np.arccos(np.clip(pts[:, 2], -1, 1))), 6)
    rot = np.round(np.rad2deg(np.arctan2(pts[:, 1], pts[:, 0])) % 360.0, 6)
    order = np.lexsort((rot, tilt))
    return pts[order]


def in_asymmetric_unit(dirs: np.ndarray, ops: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Boolean (n,): direction is in the Dirichlet cell of p0 (closest to p0 among its symmetry copies)."""
    dirs = np.asarray(dirs, dtype=float)
    copies = np.einsum("gij,nj->ngi", ops, dirs)  # (n, G, 3)
    score = copies @ _P0  # (n, G)
    return score[:, 0] >= score.max(axis=1) - tol


def region_centres(spacing_deg: float, ops: np.ndarray) -> np.ndarray:
    """Region centres (R, 3) of one asymmetric unit of the group `ops` (G, 3, 3)."""
    dirs = icosahedral_directions(subdivision_frequency(spacing_deg))
    if len(ops) == 1:
        return dirs
    kept: list[np.ndarray] = []
    for d in dirs[in_asymmetric_unit(dirs, ops, tol=1e-6)]:
        copies = ops @ d
        if not any(np.min(np.linalg.norm(copies - k, axis=1)) < 1e-5 for k in kept):
            kept.append(d)
    return np.array(kept).reshape(-1, 3)


def direction_region_distances(dirs: np.ndarray, centres: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """Angle (degrees) from each direction (n, 3) to each centre (R, 3), minimised over the
    symmetry copies of the direction. Returns (n, R)."""
    dirs = np.asarray(dirs, dtype=float)
    copies = np.einsum("gij,nj->ngi", ops, dirs)  # (n, G, 3)
    cos = np.einsum("ngi,ri->nrg", copies, np.asarray(centres, dtype=float)).max(axis=-1)
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


def assign_regions(dirs: np.ndarray, centres: np.ndarray, ops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest region of each direction (n, 3): (index (n,) int, distance to its centre (n,) degrees).
    Ties go to the lower region index, so every direction has exactly one region."""
    dist = direction_region_distances(dirs, centres, ops)
    idx = np.argmin(dist, axis=1)
    return idx, dist[np.arange(len(idx)), idx]
