"""The paper's split of the sphere into regions (icosahedral centres, asymmetric unit)."""

import numpy as np
import pytest

from deepalign_cli.core.geometry import fibonacci_sphere
from deepalign_cli.core.regions import (
    assign_regions,
    direction_region_distances,
    in_asymmetric_unit,
    region_centres,
)
from deepalign_cli.core.symmetry import symmetry_operators


def test_30_degree_spacing_gives_42_regions():
    c = region_centres(30, symmetry_operators("C1"))
    assert c.shape == (42, 3)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0)


def test_20_degree_spacing_gives_92_regions():
    assert len(region_centres(20, symmetry_operators("C1"))) == 92


def test_neighbouring_centres_are_about_the_requested_spacing_apart():
    for spacing in (30, 20):
        c = region_centres(spacing, symmetry_operators("C1"))
        ang = np.rad2deg(np.arccos(np.clip(c @ c.T, -1, 1)))
        np.fill_diagonal(ang, 360)
        nn = ang.min(axis=1)
        assert abs(np.median(nn) - spacing) < 0.2 * spacing


def test_d7_at_20_degrees_keeps_a_small_asymmetric_unit():
    # the paper: 92 regions on the sphere, 9 in D7's asymmetric unit; our Dirichlet-cell rule gives 7
    c = region_centres(20, symmetry_operators("D7"))
    assert 5 <= len(c) <= 10
    assert len(c) == 7


@pytest.mark.parametrize("sym,spacing", [("C1", 30), ("C1", 20), ("C4", 30), ("D7", 20), ("T", 20), ("O", 20), ("I1", 20)])
def test_every_direction_maps_to_exactly_one_nearby_region(sym, spacing):
    ops = symmetry_operators(sym)
    centres = region_centres(spacing, ops)
    dirs = fibonacci_sphere(5000)
    idx, dist = assign_regions(dirs, centres, ops)
    assert idx.shape == (5000,) and idx.min() >= 0 and idx.max() < len(centres)
    assert np.all(np.bincount(idx, minlength=len(centres)) > 0)  # no empty region
    # covering radius of a geodesic grid is below the spacing
    # covering radius: ~0.7·spacing for C1; the asymmetric-unit border adds a little for T/O
    assert dist.max() < 1.1 * spacing
    # non-overlapping: the assigned region is strictly nearest (or tied, resolved to one index)
    all_d = direction_region_distances(dirs, centres, ops)
    assert np.all(dist <= all_d.min(axis=1) + 1e-9)


def test_regions_are_symmetry_invariant():
    ops = symmetry_operators("D7")
    centres = region_centres(20, ops)
    dirs = fibonacci_sphere(500)
    idx, _ = assign_regions(dirs, centres, ops)
    for R in ops[1:]:
        idx_r, _ = assign_regions(dirs @ R.T, centres, ops)
        assert np.mean(idx_r == idx) > 0.99  # equal except exact ties on borders


def test_kept_centres_are_pairwise_inequivalent_and_in_one_unit():
    ops = symmetry_operators("C4")
    centres = region_centres(30, ops)
    assert np.all(in_asymmetric_unit(centres, ops, tol=1e-6))
    d = direction_region_distances(centres, centres, ops)
    np.fill_diagonal(d, 999)
    assert d.min() > 1.0
