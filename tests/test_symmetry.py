"""RELION point groups and symmetry-aware distances."""

import numpy as np
import pytest

from deepalign_cli.core import geometry as g
from deepalign_cli.core.symmetry import (
    UnknownSymmetry,
    canonical_name,
    symmetric_direction_distance_deg,
    symmetric_rotation_distance_deg,
    symmetry_operators,
)


@pytest.mark.parametrize("name,order", [("C1", 1), ("C4", 4), ("C7", 7), ("D2", 4), ("D7", 14), ("T", 12), ("O", 24), ("I1", 60), ("I2", 60)])
def test_group_orders_and_closure(name, order):
    ops = symmetry_operators(name)
    assert ops.shape == (order, 3, 3)
    np.testing.assert_allclose(ops[0], np.eye(3))
    np.testing.assert_allclose(np.einsum("gij,gkj->gik", ops, ops), np.broadcast_to(np.eye(3), ops.shape), atol=1e-9)
    prods = np.einsum("aij,bjk->abik", ops, ops).reshape(-1, 9)
    # every product is again an element of the group
    d = np.abs(prods[:, None, :] - ops.reshape(1, -1, 9)).max(-1).min(-1)
    assert d.max() < 1e-6


def test_relion_axis_conventions():
    # Dn: 2-fold about x; I1 has 2-folds on x, y and z, I2 is I1 turned 90° about z
    d7 = symmetry_operators("D7")
    assert any(np.allclose(R, np.diag([1, -1, -1]), atol=1e-9) for R in d7)
    i1, i2 = symmetry_operators("I1"), symmetry_operators("I2")
    for axis_diag in ([1, -1, -1], [-1, 1, -1], [-1, -1, 1]):
        assert any(np.allclose(R, np.diag(axis_diag), atol=1e-9) for R in i1)
    Rz = g.axis_angle_to_matrix([0, 0, 1], 90)
    turned = np.einsum("ij,gjk,lk->gil", Rz, i1, Rz)
    assert all(np.abs(i2 - t).max(axis=(1, 2)).min() < 1e-6 for t in turned)
    # a 5-fold of I1 lies in the xz plane
    angles = g.rotation_angle_deg(i1)
    five = i1[np.isclose(angles, 72.0)]
    axes = g.matrix_to_rotvec(five)
    assert np.isclose(np.abs(axes[:, 1]), 0, atol=1e-6).any()


def test_symmetry_equivalent_poses_are_at_distance_zero():
    rng = np.random.default_rng(0)
    for name in ["C4", "D7", "T", "O", "I1"]:
        ops = symmetry_operators(name)
        A = g.eulers_to_matrices(rng.uniform([-180, 0, -180], [180, 180, 180], (20, 3)))
        R = ops[rng.integers(0, len(ops), 20)]
        B = A @ R
        assert symmetric_rotation_distance_deg(A, B, ops).max() < 1e-4
        assert g.rotation_distance_deg(A, B).max() > 1.0  # without symmetry they differ
        assert symmetric_direction_distance_deg(A[:, 2], B[:, 2], ops).max() < 1e-4


def test_symmetric_distance_keeps_real_differences():
    ops = symmetry_operators("C4")
    A = g.euler_to_matrix(10, 40, 0)
    B = g.axis_angle_to_matrix([0.3, 0.2, 0.9], 7) @ A
    assert symmetric_rotation_distance_deg(A, B, ops) == pytest.approx(7.0, abs=1e-6)


@pytest.mark.parametrize("bad", ["X3", "D1", "C0", "", "Ix", "I5"])
def test_unknown_symmetry_names_are_rejected(bad):
    with pytest.raises(UnknownSymmetry):
        canonical_name(bad)


def test_names_are_normalised():
    assert canonical_name("c4") == "C4" and canonical_name("i") == "I1" and canonical_name(" d7 ") == "D7"
