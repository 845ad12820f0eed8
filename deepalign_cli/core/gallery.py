"""Galleries of projection directions for the correlation search (`align`).

A gallery is a set of unit projection directions d (the third row of the pose matrix, see
``geometry``) sampled uniformly on the sphere at an angular step, restricted to one region (plus a
margin) or to the whole asymmetric unit.

Sampling: one Fibonacci lattice with ``n = ceil(4π / step²)`` points (step in radians), i.e. one
point per ``step × step`` patch of the sphere. Its nearest-neighbour spacing is ≈ step and no
direction is further than COVERING_RADIUS_FACTOR · step from a lattice point (measured on a dense
grid for steps 3–15°: 0.766, the worst spots are next to the poles; a square lattice would give
1/√2 = 0.707). Hence a margin ≥ 2 · 0.77 · step guarantees that a pose on a region border has its
nearest lattice direction in the gallery. Every region's gallery is a subset of the SAME lattice, so the union of the
galleries of several regions is a plain union of indices (:func:`region_gallery_indices`).

Region membership is decided on 3D vectors, never on (rot, tilt): a region crossing rot = 0/360
or containing a pole needs no special case (the reference implementation's bug).

Symmetry: region centres lie in one asymmetric unit (``regions.region_centres``). A lattice point d
belongs to region r (plus margin) when its *literal* angle to the centre c_r is at most the
symmetry-aware distance from d to the nearest centre (min over all centres and all symmetry copies
of d) plus the margin. Using the literal angle to c_r (not its minimum over the copies of d) keeps
exactly one copy of each direction near c_r, so the union over all regions without margin covers
one asymmetric unit once and the symmetric copies (which would give the same references) are not
searched G times.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .geometry import fibonacci_sphere
from .preprocess import PAPER_PIXEL_PER_RESOLUTION
from .regions import direction_region_distances

COVERING_RADIUS_FACTOR = 0.77  # max angle from any direction to the lattice, in units of the step
TIE_TOLERANCE_DEG = 1e-6  # a lattice point on a region border belongs to both regions
NYQUIST_PX = 2.0  # the finest resolution an image holds, in pixels


def default_angular_step_deg(resolution_ang: float, diameter_ang: float) -> float:
    """Gallery direction step (degrees) from the target resolution and the particle diameter.

    Crowther's criterion: two projections whose directions differ by Δθ agree to resolution d when
    the particle's rim (radius D/2) moves by less than d/2, i.e. Δθ ≈ d / D radians. We use
    ``atan(d / D)`` (the same for small angles). Example: 10 Å at D = 400 Å → 1.43°.
    resolution_ang: target resolution d in Å.  diameter_ang: particle diameter D in Å (use the box
    size × pixel size when unknown).
    """
    return float(np.rad2deg(np.arctan(resolution_ang / diameter_ang)))


def border_margin_deg(step_deg: float) -> float:
    """Smallest gallery margin (degrees) that keeps the nearest lattice direction of a pose on a
    region border inside the region's gallery: 2 × COVERING_RADIUS_FACTOR × step."""
    return 2 * COVERING_RADIUS_FACTOR * step_deg


class SearchGeometry(NamedTuple):
    """How finely one correlation search samples poses and frequencies.

    resolution_ang: band limit (Å) of the reference low-pass and of the score.
    angular_step_deg: gallery direction step.  psi_step_deg: in-plane step.
    margin_deg: how far each region's gallery extends past the region border.
    """

    resolution_ang: float
    angular_step_deg: float
    psi_step_deg: float
    margin_deg: float


def search_geometry(box_px: int, pixel_ang: float, *, lowpass_resolution_ang: float | None = None,
                    target_resolution_ang: float | None = None, angular_step_deg: float | None = None,
                    psi_step_deg: float | None = None, min_margin_deg: float = 0.0) -> SearchGeometry:
    """The search geometry of `align`, with every value not given filled by its default.

    box_px, pixel_ang: the particles' working box (px) and pixel size (Å/px).
    resolution: lowpass_resolution_ang, else target_resolution_ang, else PAPER_PIXEL_PER_RESOLUTION
    × pixel (the paper's pixel = resolution / 3); never finer than Nyquist (2 px).
    angular step: angular_step_deg, else Crowther (:func:`default_angular_step_deg` with the box
    size in Å as the diameter).  psi step: psi_step_deg, else the angular step.
    margin: min_margin_deg (degrees), raised to :func:`border_margin_deg` of the angular step.
    A None or 0 value counts as not given.
    """
    resolution = lowpass_resolution_ang or target_resolution_ang or PAPER_PIXEL_PER_RESOLUTION * pixel_ang
    resolution = max(resolution, NYQUIST_PX * pixel_ang)
    step = angular_step_deg or default_angular_step_deg(resolution, box_px * pixel_ang)
    psi = psi_step_deg or step
    return SearchGeometry(resolution, step, psi, max(min_margin_deg, border_margin_deg(step)))


def sphere_lattice(step_deg: float) -> np.ndarray:
    """Uniform directions (n, 3) with one point per step² patch: ``n = ceil(4π / step_rad²)``."""
    step = np.deg2rad(float(step_deg))
    return fibonacci_sphere(int(np.ceil(4.0 * np.pi / step**2)))


def region_gallery_masks(lattice: np.ndarray, centres: np.ndarray, ops: np.ndarray, regions, margin_deg: float) -> np.ndarray:
    """Membership (len(regions), L) bool of every lattice direction in each of `regions` (each
    extended by a margin), computed with ONE symmetry-aware distance evaluation, so the galleries of
    many region groups cost one pass over the lattice (:func:`region_gallery_indices` is the union
    of rows).

    lattice: (L, 3) unit vectors (from :func:`sphere_lattice`).  centres: (R, 3) region centres.
    ops: (G, 3, 3) symmetry operators.  regions: iterable of region indices.  margin_deg: degrees.
    """
    lattice = np.asarray(lattice, dtype=float)
    centres = np.asarray(centres, dtype=float)
    nearest = direction_region_distances(lattice, centres, ops).min(axis=1)  # (L,) symmetry-aware
    regions = np.atleast_1d(np.asarray(regions, dtype=int))
    literal = np.rad2deg(np.arccos(np.clip(lattice @ centres[regions].T, -1.0, 1.0)))  # (L, r)
    return (literal <= (nearest + margin_deg + TIE_TOLERANCE_DEG)[:, None]).T


def region_gallery_indices(lattice: np.ndarray, centres: np.ndarray, ops: np.ndarray, regions, margin_deg: float) -> np.ndarray:
    """Indices into `lattice` of the directions inside any of `regions`, each extended by a margin.

    lattice: (L, 3) unit vectors (from :func:`sphere_lattice`).  centres: (R, 3) region centres.
    ops: (G, 3, 3) symmetry operators.  regions: iterable of region indices.  margin_deg: degrees.
    Returns sorted unique int indices (m,).
    """
    return np.flatnonzero(region_gallery_masks(lattice, centres, ops, regions, margin_deg).any(axis=0))


def region_gallery(centres: np.ndarray, ops: np.ndarray, region: int, step_deg: float, margin_deg: float) -> np.ndarray:
    """Directions (m, 3) of one region plus a margin, sampled at `step_deg` (see module docstring).

    centres: (R, 3) unit region centres.  ops: (G, 3, 3).  region: index into centres.
    step_deg, margin_deg: degrees. A pose within `margin_deg` of the region border is still found.
    """
    lattice = sphere_lattice(step_deg)
    return lattice[region_gallery_indices(lattice, centres, ops, [region], margin_deg)]


def asymmetric_unit_gallery(centres: np.ndarray, ops: np.ndarray, step_deg: float) -> np.ndarray:
    """Directions (m, 3) of the whole asymmetric unit (the union of every region, no margin):
    the gallery of the exhaustive search (`align --exhaustive`)."""
    lattice = sphere_lattice(step_deg)
    return lattice[region_gallery_indices(lattice, centres, ops, range(len(centres)), 0.0)]
