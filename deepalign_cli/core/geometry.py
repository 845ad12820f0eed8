"""Euler angles, rotation matrices and angular distances, exactly as RELION.

Convention (RELION `Euler_angles2matrix`, ZYZ, degrees): for angles (rot, tilt, psi) the matrix
``A`` maps map coordinates to image coordinates, and a particle image is the projection

    P[y, x] = Σ_z V(Aᵀ · (x, y, z))      (V indexed vol[z, y, x], coordinates from index N//2)

``Aᵀ`` equals scipy's ``Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True)``.
The projection direction of a pose (the beam direction in map coordinates) is ``Aᵀ · ẑ``, the third
row of ``A``: ``(cos rot · sin tilt, sin rot · sin tilt, cos tilt)``, independent of psi.

Every function accepts numpy or JAX arrays with any leading batch shape and returns the same kind
(numpy in float64 for I/O-side work, JAX when traced).
"""

from __future__ import annotations

import numpy as np

try:  # jax is a dependency, but keep geometry importable for light tools
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover
    jax = None
    jnp = None


def _xp(*arrays):
    """numpy for numpy/python inputs, jax.numpy as soon as one input is a JAX array/tracer."""
    if jax is not None and any(isinstance(a, jax.Array) for a in arrays):
        return jnp
    return np


def euler_to_matrix(rot_deg, tilt_deg, psi_deg):
    """RELION `Euler_angles2matrix`. Angles: (...) degrees. Returns (..., 3, 3)."""
    xp = _xp(rot_deg, tilt_deg, psi_deg)
    a, b, g = (xp.deg2rad(xp.asarray(v, dtype=float if xp is np else None)) for v in (rot_deg, tilt_deg, psi_deg))
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def eulers_to_matrices(eulers_deg):
    """(..., 3) [rot, tilt, psi] degrees → (..., 3, 3)."""
    xp = _xp(eulers_deg)
    e = xp.asarray(eulers_deg)
    return euler_to_matrix(e[..., 0], e[..., 1], e[..., 2])


def matrix_to_euler(A):
    """RELION `Euler_matrix2angles`. A: (..., 3, 3). Returns (..., 3) [rot, tilt, psi] degrees,
    rot and psi in (-180, 180], tilt in [0, 180]."""
    xp = _xp(A)
    A = xp.asarray(A)
    eps = float(np.finfo(np.float32).eps)
    abs_sb = xp.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * eps
    gamma = xp.arctan2(A[..., 1, 2], -A[..., 0, 2])
    alpha = xp.arctan2(A[..., 2, 1], A[..., 2, 0])
    sg = xp.sin(gamma)
    sign_sb = xp.where(
        xp.abs(sg) < eps,
        xp.sign(-A[..., 0, 2] / xp.cos(gamma)),
        xp.where(sg > 0, xp.sign(A[..., 1, 2]), -xp.sign(A[..., 1, 2])),
    )
    beta = xp.arctan2(sign_sb * abs_sb, A[..., 2, 2])
    # degenerate tilt = 0 or 180: RELION puts everything in psi
    up = A[..., 2, 2] > 0
    gamma_d = xp.where(up, xp.arctan2(-A[..., 1, 0], A[..., 0, 0]), xp.arctan2(A[..., 1, 0], -A[..., 0, 0]))
    beta_d = xp.where(up, 0.0, np.pi)
    alpha = xp.where(regular, alpha, 0.0)
    beta = xp.where(regular, beta, beta_d)
    gamma = xp.where(regular, gamma, gamma_d)
    return xp.rad2deg(xp.stack([alpha, beta, gamma], axis=-1))


def projection_direction(rot_deg, tilt_deg):
    """Unit projection direction (..., 3) of a pose: third row of RELION's matrix (psi-free)."""
    xp = _xp(rot_deg, tilt_deg)
    a, b = xp.deg2rad(xp.asarray(rot_deg)), xp.deg2rad(xp.asarray(tilt_deg))
    return xp.stack([xp.cos(a) * xp.sin(b), xp.sin(a) * xp.sin(b), xp.cos(b)], axis=-1)


def direction_to_angles(d):
    """Unit vectors (..., 3) → (rot, tilt) degrees of the poses that look along them."""
    xp = _xp(d)
    d = xp.asarray(d)
    tilt = xp.rad2deg(xp.arccos(xp.clip(d[..., 2], -1.0, 1.0)))
    rot = xp.rad2deg(xp.arctan2(d[..., 1], d[..., 0]))
    return rot, tilt


def angle_between_directions_deg(d1, d2):
    """Angle (degrees) between unit vectors (..., 3), broadcast."""
    xp = _xp(d1, d2)
    c = xp.sum(xp.asarray(d1) * xp.asarray(d2), axis=-1)
    return xp.rad2deg(xp.arccos(xp.clip(c, -1.0, 1.0)))


def rotation_angle_deg(R):
    """Rotation angle (degrees) of rotation matrices (..., 3, 3) — the geodesic distance to I."""
    xp = _xp(R)
    tr = xp.trace(xp.asarray(R), axis1=-2, axis2=-1)
    return xp.rad2deg(xp.arccos(xp.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def rotation_distance_deg(A1, A2):
    """Geodesic distance (degrees) between rotations (..., 3, 3), broadcast: angle of A1·A2ᵀ."""
    xp = _xp(A1, A2)
    A1, A2 = xp.asarray(A1), xp.asarray(A2)
    # trace(A1 A2ᵀ) = Σ_ij A1_ij A2_ij (cheaper and better conditioned than a matmul)
    tr = xp.sum(A1 * A2, axis=(-2, -1))
    return xp.rad2deg(xp.arccos(xp.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def axis_angle_to_matrix(axis, angle_deg):
    """Right-handed rotation by angle_deg about unit axis (3,) (Rodrigues). Returns (3, 3) numpy."""
    k = np.asarray(axis, dtype=float)
    k = k / np.linalg.norm(k)
    t = np.deg2rad(angle_deg)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def rotvec_to_matrix(rotvec):
    """Axis-angle vectors (..., 3) (angle = norm, radians) → rotation matrices (..., 3, 3), numpy."""
    v = np.asarray(rotvec, dtype=float)
    theta = np.linalg.norm(v, axis=-1)[..., None, None]
    safe = np.where(theta > 1e-12, theta, 1.0)
    k = v / safe[..., 0]
    K = np.zeros(v.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2] = -k[..., 2], k[..., 1]
    K[..., 1, 0], K[..., 1, 2] = k[..., 2], -k[..., 0]
    K[..., 2, 0], K[..., 2, 1] = -k[..., 1], k[..., 0]
    eye = np.broadcast_to(np.eye(3), K.shape)
    R = eye + np.sin(theta) * K + (1 - np.cos(theta)) * (K @ K)
    return np.where(theta > 1e-12, R, eye)


def matrix_to_rotvec(R):
    """Rotation matrices (..., 3, 3) → axis-angle vectors (..., 3) (radians), numpy."""
    R = np.asarray(R, dtype=float)
    theta = np.deg2rad(rotation_angle_deg(R))
    w = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], axis=-1)
    s = np.sin(theta)
    small = s > 1e-6
    v = np.where(small[..., None], w * (theta / np.where(small, 2 * s, 1.0))[..., None], 0.5 * w)
    # near 180°: axis from the diagonal
    near_pi = theta > np.pi - 1e-3
    if np.any(near_pi):
        Rp = R[near_pi]
        axes = np.sqrt(np.clip((np.diagonal(Rp, axis1=-2, axis2=-1) + 1) / 2, 0, None))
        i = np.argmax(axes, axis=-1)
        col = Rp[np.arange(len(Rp)), :, i] + np.eye(3)[i]
        ax = col / np.linalg.norm(col, axis=-1, keepdims=True)
        v[near_pi] = ax * theta[near_pi][..., None]
    return v


def fibonacci_sphere(n):
    """n nearly uniform unit vectors (n, 3) on the sphere (numpy float64)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    r = np.sqrt(np.clip(1 - z * z, 0, None))
    phi = np.pi * (1 + 5**0.5) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)
