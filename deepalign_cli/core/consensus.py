"""Pose agreement between alignment methods (paper §2.5, "consensus tool").

Several programs assign a pose to every particle; where they disagree by more than a threshold the
assignment is unreliable and the particle is dropped. Poses are RELION Euler angles in degrees
(`core.geometry`); symmetry is a (G, 3, 3) operator array from `core.symmetry`, under which pose A
is equivalent to A·R and projection direction d to R d, so every difference is the minimum over
the group.

Particles are matched across inputs by `rlnImageName` (`index@stack`). Programs write the same
image differently (`000001@Extract/job7/a.mrcs`, `1@/data/Extract/job7/a.mrcs`), so a name is
compared as (integer index, the last k components of the stack path), with the smallest k ≥ 1 that
keeps every input's names unique: normally just the stack's file name, more of the path only when
two stacks in one input share a file name.
"""

from __future__ import annotations

import numpy as np

from .geometry import eulers_to_matrices, projection_direction
from .symmetry import symmetric_direction_distance_deg, symmetric_rotation_distance_deg

MODES = ("rotation", "direction")

# particle × operator products are evaluated in blocks of this many (particle, operator) pairs
_CHUNK_PAIRS = 1 << 18


class DuplicateNames(ValueError):
    """An input holds the same image twice; args: (input index, the repeated name)."""


class BadImageName(ValueError):
    """A name is not `index@stack` with a positive integer index; args: (input index, name)."""


def pose_differences(eulers_a, eulers_b, ops, mode: str = "rotation") -> np.ndarray:
    """Angular difference (degrees) between two pose sets, minimised over the symmetry group.

    eulers_a, eulers_b: (n, 3) [rot, tilt, psi] degrees.  ops: (G, 3, 3) group operators.
    mode 'rotation': geodesic distance between the full rotations A_a and A_b·R (0…180°);
    mode 'direction': angle between projection directions d_a and R d_b only (psi ignored).
    Returns (n,) float64.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    ea = np.asarray(eulers_a, dtype=float).reshape(-1, 3)
    eb = np.asarray(eulers_b, dtype=float).reshape(-1, 3)
    if ea.shape != eb.shape:
        raise ValueError(f"pose sets differ in length: {len(ea)} vs {len(eb)}")
    ops = np.asarray(ops, dtype=float)
    step = max(1, _CHUNK_PAIRS // len(ops))
    out = np.empty(len(ea))
    for s in range(0, len(ea), step):
        a, b = ea[s : s + step], eb[s : s + step]
        if mode == "rotation":
            out[s : s + step] = symmetric_rotation_distance_deg(eulers_to_matrices(a), eulers_to_matrices(b), ops)
        else:
            da = projection_direction(a[:, 0], a[:, 1])
            db = projection_direction(b[:, 0], b[:, 1])
            out[s : s + step] = symmetric_direction_distance_deg(da, db, ops)
    return out


def consensus_mask(eulers_list, ops, threshold_deg: float, mode: str = "rotation"):
    """Particles on which every pair of inputs agrees within `threshold_deg` (difference ≤ threshold).

    eulers_list: list of m ≥ 2 arrays (n, 3) degrees, row i of each being the same particle.
    Returns (mask (n,) bool, {(i, j): (n,) differences in degrees for i < j}).
    """
    if len(eulers_list) < 2:
        raise ValueError("consensus needs at least two pose sets")
    n = len(eulers_list[0])
    mask = np.ones(n, dtype=bool)
    pairwise = {}
    for i in range(len(eulers_list)):
        for j in range(i + 1, len(eulers_list)):
            d = pose_differences(eulers_list[i], eulers_list[j], ops, mode)
            pairwise[(i, j)] = d
            mask &= d <= threshold_deg
    return mask, pairwise


def _split_name(name: str) -> tuple[int, list[str]]:
    """'000012@./Extract/a.mrcs' → (12, ['Extract', 'a.mrcs']); a bare file name is image 1 of it
    (as `io.mrc.parse_image_name`). Raises ValueError if malformed."""
    name = str(name).strip()
    index, _, stack = name.partition("@") if "@" in name else ("1", "@", name)
    i = int(index)
    parts = [p for p in stack.replace("\\", "/").split("/") if p not in ("", ".")]
    if i < 1 or not parts:
        raise ValueError(name)
    return i, parts


def image_keys(names_list, depth: int | None = None):
    """Comparable keys 'index@last/k/path/parts' for every name of every input.

    names_list: list of (n_i,) arrays of `rlnImageName` strings. depth: path components kept;
    None chooses the smallest depth that makes each input's keys unique.
    Returns (list of (n_i,) object arrays of keys, depth used).
    """
    split = []
    for k, names in enumerate(names_list):
        rows = []
        for name in names:
            try:
                rows.append(_split_name(name))
            except ValueError:
                raise BadImageName(k, str(name)) from None
        split.append(rows)
    max_depth = max((len(p) for rows in split for _, p in rows), default=1)
    for d in [depth] if depth is not None else range(1, max_depth + 1):
        keys = [np.array([f"{i}@{'/'.join(p[-d:])}" for i, p in rows], dtype=object) for rows in split]
        dups = [_first_duplicate(kk) for kk in keys]
        if all(dup is None for dup in dups):
            return keys, d
    k = next(k for k, dup in enumerate(dups) if dup is not None)
    raise DuplicateNames(k, dups[k])


def _first_duplicate(keys) -> str | None:
    """The first key (sorted) that occurs more than once, or None."""
    uniq, counts = np.unique(keys.astype(str), return_counts=True)
    return str(uniq[counts > 1][0]) if np.any(counts > 1) else None


def match_by_name(names_list):
    """Match particles across inputs by normalised image name (see module docstring).

    names_list: list of m (n_i,) arrays of `rlnImageName` strings.
    Returns (common, indices, missing):
      common  (n_common,) keys of the particles present in every input, in the first input's order
              (for a key absent from the first input, the order it is first met in the others);
      indices list of m (n_common,) int arrays: row of each common particle in input k;
      missing list of m arrays: original names (as written by the first input holding them) of the
              particles absent from input k but present in another input.
    """
    keys, _ = image_keys(names_list)
    lookup = [{key: row for row, key in enumerate(kk)} for kk in keys]
    order, origin = [], {}
    for k, kk in enumerate(keys):
        for row, key in enumerate(kk):
            if key not in origin:
                origin[key] = (k, row)
                order.append(key)
    common = [key for key in order if all(key in lk for lk in lookup)]
    indices = [np.array([lk[key] for key in common], dtype=np.int64) for lk in lookup]
    missing = []
    for lk in lookup:
        absent = [key for key in order if key not in lk]
        missing.append(np.array([str(names_list[origin[key][0]][origin[key][1]]) for key in absent], dtype=object))
    return np.array(common, dtype=object), indices, missing
