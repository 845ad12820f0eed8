"""RELION Euler conventions (Euler_angles2matrix / Euler_matrix2angles) and angular distances."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from deepalign_cli.core import geometry as g


def random_eulers(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-180, 180, n), np.rad2deg(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)], 1)


def test_matrix_transpose_equals_scipy_intrinsic_zyz():
    e = random_eulers(50)
    A = g.eulers_to_matrices(e)
    ref = Rotation.from_euler("ZYZ", e, degrees=True).as_matrix()
    np.testing.assert_allclose(np.swapaxes(A, -1, -2), ref, atol=1e-12)


def test_relion_matrix_entries_for_known_angles():
    # RELION Euler_angles2matrix(90, 0, 0): rotation of -90° about z in image coordinates
    np.testing.assert_allclose(g.euler_to_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    # tilt 90: the z axis of the map becomes image x (A[0,2] = -cos psi sin tilt)
    np.testing.assert_allclose(g.euler_to_matrix(0, 90, 0)[:, 2], [-1, 0, 0], atol=1e-12)


def test_euler_round_trip_matches_relion():
    e = random_eulers(200, seed=1)
    back = g.matrix_to_euler(g.eulers_to_matrices(e))
    np.testing.assert_allclose(g.eulers_to_matrices(back), g.eulers_to_matrices(e), atol=1e-9)
    ok = (e[:, 1] > 1) & (e[:, 1] < 179)
    np.testing.assert_allclose(back[ok], e[ok], atol=1e-7)


def test_degenerate_tilt_puts_rotation_in_psi():
    back = g.matrix_to_euler(g.euler_to_matrix(30.0, 0.0, 20.0))
    np.testing.assert_allclose(back, [0, 0, 50], atol=1e-9)
    A = g.euler_to_matrix(30.0, 180.0, 20.0)
    np.testing.assert_allclose(g.eulers_to_matrices(g.matrix_to_euler(A)), A, atol=1e-9)


def test_projection_direction_is_third_row_and_ignores_psi():
    e = random_eulers(20, seed=2)
    A = g.eulers_to_matrices(e)
    np.testing.assert_allclose(g.projection_direction(e[:, 0], e[:, 1]), A[:, 2, :], atol=1e-12)
    rot, tilt = g.direction_to_angles(A[:, 2, :])
    np.testing.assert_allclose(g.projection_direction(rot, tilt), A[:, 2, :], atol=1e-12)


def test_jax_and_numpy_paths_agree():
    e = random_eulers(10, seed=3)
    A_np = g.eulers_to_matrices(e)
    A_jx = g.eulers_to_matrices(jnp.asarray(e, dtype=jnp.float32))
    np.testing.assert_allclose(np.asarray(A_jx), A_np, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g.matrix_to_euler(A_jx))[:, 1], e[:, 1], atol=1e-2)


def test_rotation_distance_is_the_angle_of_the_relative_rotation():
    A = g.euler_to_matrix(10, 20, 30)
    B = g.axis_angle_to_matrix([1, 2, 3], 7.0) @ A
    assert g.rotation_distance_deg(A, B) == pytest.approx(7.0, abs=1e-6)
    assert g.rotation_distance_deg(A, A) == pytest.approx(0.0, abs=1e-5)


def test_rotvec_round_trip_including_near_180_degrees():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(100, 3))
    v = v / np.linalg.norm(v, axis=1, keepdims=True) * rng.uniform(0, np.pi - 1e-4, (100, 1))
    R = g.rotvec_to_matrix(v)
    np.testing.assert_allclose(R, Rotation.from_rotvec(v).as_matrix(), atol=1e-9)
    np.testing.assert_allclose(g.rotvec_to_matrix(g.matrix_to_rotvec(R)), R, atol=1e-6)
