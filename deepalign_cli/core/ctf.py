"""Contrast transfer function, RELION's formula and sign (``CTF::getCTF``, RELION 3.1).

For spatial frequency s = (sx, sy) in 1/Å (sx along image columns x, sy along rows y):

    λ      = 12.2643247 / sqrt(V · (1 + 0.978466e-6 · V))        Å, V in volts (relativistic)
    Δf(s)  = -[(ΔU + ΔV)/2 + (ΔU - ΔV)/2 · cos(2 (atan2(sy, sx) - θ_ast))]   Å (underfocus > 0 in)
    χ(s)   = π λ Δf |s|² + (π/2) Cs λ³ |s|⁴ - φ - atan(Q0 / sqrt(1 - Q0²))
    CTF(s) = -sin χ(s) · exp(-B |s|² / 4)

with ΔU, ΔV = rlnDefocusU/V (Å), θ_ast = rlnDefocusAngle, Cs in Å (mm · 10⁷), Q0 the amplitude
contrast, φ the phase shift and B the B-factor (Å²). Consequences: CTF(0) = +Q0, and for
underfocus (ΔU, ΔV > 0) the CTF is positive at low frequency, so a CTF-modulated projection keeps the
sign of the density at low resolution. ``relion_project --ctf`` agrees with :func:`ctf_2d` to
NCC ≥ 0.99 (tests/test_ctf.py).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

ELECTRON_WAVELENGTH_CONST_ANG = 12.2643247  # h / sqrt(2 m0 e) in Å·V^½
RELATIVISTIC_CORRECTION_PER_V = 0.978466e-6  # e / (2 m0 c²) in 1/V
MM_TO_ANG = 1e7


def electron_wavelength_ang(voltage_kv):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (e.g. 300 → 0.0197)."""
    v = jnp.asarray(voltage_kv, jnp.float32) * 1e3
    return ELECTRON_WAVELENGTH_CONST_ANG / jnp.sqrt(v * (1.0 + RELATIVISTIC_CORRECTION_PER_V * v))


def freq_grid(box: int, pixel_size_ang):
    """Spatial-frequency grid of an N×N image, unshifted numpy-FFT layout (DC at [0, 0]).

    box: N (static).  pixel_size_ang: scalar Å/px.
    Returns (sy, sx), each (N, N) float32 in 1/Å; sy varies along rows (y), sx along columns (x).
    """
    k = jnp.asarray(np.fft.fftfreq(box), jnp.float32) / jnp.asarray(pixel_size_ang, jnp.float32)
    sy, sx = jnp.meshgrid(k, k, indexing="ij")
    return sy, sx


@partial(jax.jit, static_argnames="box")
def ctf_2d(
    box: int,
    pixel_size_ang,
    defocus_u_ang,
    defocus_v_ang,
    defocus_angle_deg,
    voltage_kv,
    cs_mm,
    amplitude_contrast,
    bfactor_ang2=0.0,
    phase_shift_deg=0.0,
):
    """RELION CTF for n particles on the unshifted full-FFT grid of an N×N image.

    box: N (static).  pixel_size_ang: scalar Å/px.
    defocus_u_ang, defocus_v_ang: (n,) Å (or scalars), underfocus positive.
    defocus_angle_deg: (n,) astigmatism angle θ_ast in degrees, from the x axis towards y.
    voltage_kv, cs_mm, amplitude_contrast, bfactor_ang2, phase_shift_deg: scalars or (n,).
    Returns (n, N, N) float32 (n = 1 when every parameter is a scalar).
    """
    sy, sx = freq_grid(box, pixel_size_ang)

    def col(v):
        return jnp.atleast_1d(jnp.asarray(v, jnp.float32))[:, None, None]

    du, dv, ang = col(defocus_u_ang), col(defocus_v_ang), jnp.deg2rad(col(defocus_angle_deg))
    lam = electron_wavelength_ang(col(voltage_kv))
    cs = col(cs_mm) * MM_TO_ANG
    q0 = col(amplitude_contrast)
    s2 = sx**2 + sy**2
    deltaf = -(0.5 * (du + dv) + 0.5 * (du - dv) * jnp.cos(2.0 * (jnp.arctan2(sy, sx) - ang)))
    chi = (
        jnp.pi * lam * deltaf * s2
        + 0.5 * jnp.pi * cs * lam**3 * s2**2
        - jnp.deg2rad(col(phase_shift_deg))
        - jnp.arctan(q0 / jnp.sqrt(1.0 - q0**2))
    )
    ctf = -jnp.sin(chi) * jnp.exp(-col(bfactor_ang2) / 4.0 * s2)
    return ctf.astype(jnp.float32)
