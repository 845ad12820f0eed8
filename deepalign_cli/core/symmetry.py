"""Point-group symmetry as RELION names it (chiral groups only: C1, Cn, Dn, T, O, I1, I2).

Groups are generated from RELION's `symmetries.cpp` generator axes (right-handed rotations):

* ``Cn``  — n-fold about z.
* ``Dn``  — n-fold about z, 2-fold about x.
* ``T``   — 3-fold about z, 2-fold about (0, 0.816496580927726, 0.577350269189626).
* ``O``   — 3-fold about (1, 1, 1)/√3, 4-fold about z.
* ``I1``  — 2-fold z, 5-fold (0.525731112119, 0, 0.850650808354), 3-fold (0, 0.356822089773, 0.934172358963)
  (RELION's default ``I``: the Crowther convention, 2-folds on x, y, z with a 5-fold in the xz plane).
* ``I2``  — 2-fold z, 5-fold (0, 0.525731112119, 0.850650808354), 3-fold (0.356822089773, 0, 0.934172358963)
  (I1 rotated 90° about z: 5-fold in the yz plane).

RELION's I3/I4 (5-fold on z) are not provided yet: use I1/I2 and rotate the map.

A map with symmetry G satisfies V(R x) = V(x) for all R in G, so a pose with RELION matrix A is
equivalent to A·R, and a projection direction d (third row of A) to R d.
"""

from __future__ import annotations

import re

import numpy as np

from .geometry import axis_angle_to_matrix

_I_GENERATORS = {
    "I1": [(2, (0, 0, 1)), (5, (0.525731112119, 0, 0.850650808354)), (3, (0, 0.356822089773, 0.934172358963))],
    "I2": [(2, (0, 0, 1)), (5, (0, 0.525731112119, 0.850650808354)), (3, (0.356822089773, 0, 0.934172358963))],
}

_ORDER = {"T": 12, "O": 24, "I": 60}


class UnknownSymmetry(ValueError):
    """Raised for a name RELION would not accept (the command layer names the option)."""


def canonical_name(name: str) -> str:
    """Normalise a symmetry name: 'c4' → 'C4', 'i' → 'I1', 'd7' → 'D7'. Raises UnknownSymmetry."""
    s = str(name).strip().upper()
    if s == "I":
        s = "I1"
    if re.fullmatch(r"[CD][1-9][0-9]*", s) or s in ("T", "O") or s in _I_GENERATORS:
        if s[0] == "D" and int(s[1:]) < 2:
            raise UnknownSymmetry(f"unknown symmetry {name!r}: Dn needs n ≥ 2")
        return s
    raise UnknownSymmetry(f"unknown symmetry {name!r}: use C1, Cn, Dn, T, O, I1 or I2 (RELION names)")


def _generators(name: str):
    if name[0] == "C":
        return [(int(name[1:]), (0, 0, 1))]
    if name[0] == "D":
        return [(int(name[1:]), (0, 0, 1)), (2, (1, 0, 0))]
    if name == "T":
        return [(3, (0, 0, 1)), (2, (0, 0.816496580927726, 0.577350269189626))]
    if name == "O":
        return [(3, (1, 1, 1)), (4, (0, 0, 1))]
    return _I_GENERATORS[name]


def _close_group(gens: list[np.ndarray], max_order: int = 200) -> np.ndarray:
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in gens:
                m = h @ g
                if not any(np.allclose(m, x, atol=1e-6) for x in group):
                    group.append(m)
                    new.append(m)
        frontier = new
        if len(group) > max_order:  # pragma: no cover - guards against bad generator axes
            raise RuntimeError("symmetry group did not close")
    return np.array(group)


def symmetry_operators(name: str) -> np.ndarray:
    """Rotation matrices (G, 3, 3) float64 of the group, identity first."""
    name = canonical_name(name)
    gens = [axis_angle_to_matrix(axis, 360.0 / n) for n, axis in _generators(name)]
    ops = _close_group(gens)
    expected = {"C": lambda n: n, "D": lambda n: 2 * n}.get(name[0], lambda n: _ORDER[name[0]])(
        int(name[1:]) if name[0] in "CD" else 0
    )
    assert len(ops) == expected, (name, len(ops))
    return ops


def symmetric_rotation_distance_deg(A1, A2, ops) -> np.ndarray:
    """Geodesic distance (degrees) between poses A1, A2 (..., 3, 3), minimised over A2·R, R ∈ ops."""
    A1 = np.asarray(A1, dtype=float)
    A2R = np.einsum("...ij,gjk->...gik", np.asarray(A2, dtype=float), ops)
    tr = np.einsum("...ij,...gij->...g", A1, A2R)
    ang = np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))
    return ang.min(axis=-1)


def symmetric_direction_distance_deg(d1, d2, ops) -> np.ndarray:
    """Angle (degrees) between projection directions d1, d2 (..., 3), minimised over R d2."""
    Rd2 = np.einsum("gij,...j->...gi", ops, np.asarray(d2, dtype=float))
    c = np.einsum("...i,...gi->...g", np.asarray(d1, dtype=float), Rd2)
    return np.rad2deg(np.arccos(np.clip(c.max(axis=-1), -1.0, 1.0)))
