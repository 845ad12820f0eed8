"""Synthetic training examples: projections of the reference map with the data's own CTFs and noise.

The labelled subset is small (the paper: 5,000 of 85,000 particles; ~10–50 per region) and at
realistic SNR too small to learn 42 regions from. The reference map is not: any number of exactly
labelled examples can be made from it. Each synthetic image is

    image = normalise( IFT[ CTF_j · S(−origin) · P̂(A) ] · a  +  coloured noise )

with A uniform over SO(3) (its label: the region of its projection direction), CTF_j the CTF of a
real particle j drawn from the project's table (defocus, astigmatism, voltage, Cs, amplitude
contrast), origin uniform within the data's shift range, and Gaussian noise whose radial power
spectrum is the real particles' (:func:`radial_power`: at SNR ≤ 0.1 a particle's power is ~90 %
noise), scaled so that var(signal) / var(noise) is the data's SNR (:func:`estimate_snr`: the
labelled particles against the reference at their poses). The normalisation is the one real
particles get (``preprocess.normalize_background``).

Training makes them inside its jitted batch makers (:func:`generate` with a :class:`Generator`
holding the map, CTF rows and noise amplitude on the device): every step gets new examples and none
is stored, so the count is unbounded and memory does not grow with it. A per-region net asks for
half of its examples from the cap that holds its region, so it sees positives. Measured
(benchmarks/RESULTS.md, "Synthetic examples made in the training step"): at the same training
budget, top-2 0.291 with a fixed set of 1,000 pre-made examples per region, 0.377–0.415 made in
the step.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import ctf as ctf_mod
from . import geometry, projector
from .preprocess import normalize_background
from .regions import assign_regions
from .simulate import random_eulers_deg

CTF_KEYS = ("defocus_u_ang", "defocus_v_ang", "defocus_angle_deg", "voltage_kv", "cs_mm", "amplitude_contrast", "bfactor_ang2",
            "phase_shift_deg")
SNR_RANGE = (1e-3, 10.0)  # a measured SNR is clipped to this range


def _shells(box: int) -> np.ndarray:
    """(N, N) int: the Fourier shell round(|k|) of every coefficient of an unshifted 2D FFT."""
    k = np.fft.fftfreq(box) * box
    return np.round(np.hypot(k[:, None], k[None, :])).astype(int)


def radial_power(images) -> np.ndarray:
    """(N//2 + 1 + …,) mean power |FFT|² / N² per Fourier shell of images (n, N, N) (white noise of
    variance 1 gives 1 in every shell); the DC shell is set to 0."""
    images = np.asarray(images, np.float32)
    box = images.shape[-1]
    power = (np.abs(np.fft.fft2(images)) ** 2).mean(axis=0) / box**2
    shells = _shells(box).ravel()
    out = np.bincount(shells, power.ravel()) / np.maximum(np.bincount(shells), 1)
    out[0] = 0.0
    return out.astype(np.float32)


def ctf_table(ctf_params: Mapping | None, n: int) -> np.ndarray | None:
    """(n, 8) float32 rows of per-particle CTF parameters (CTF_KEYS order), None without a CTF."""
    if ctf_params is None:
        return None
    return np.stack([np.broadcast_to(np.asarray(ctf_params.get(k, 0.0), np.float32), (n,)) for k in CTF_KEYS], axis=1)


@jax.jit
def _fit_signal(images, model):
    """Per image: (var of the scaled model a·m, var of the residual I − a·m), a least squares."""
    a = jnp.sum(images * model, axis=(1, 2)) / jnp.maximum(jnp.sum(model * model, axis=(1, 2)), 1e-30)
    fit = a[:, None, None] * model
    return jnp.var(fit, axis=(1, 2)), jnp.var(images - fit, axis=(1, 2))


def estimate_snr(images, vol_ft: projector.VolumeFT, eulers_deg, origins_px, ctfs, chunk: int = 128) -> float:
    """var(signal) / var(noise) of particles (n, N, N) with known poses: each image is fitted by its
    scaled reference projection (CTF applied, translated by −origin) and the signal is the fit, the
    noise the residual (the residual also holds what the reference lacks, so a poor reference gives
    a low estimate). ctfs: (n, N, N) on the unshifted grid, or None. Clipped to SNR_RANGE."""
    images = np.asarray(images, np.float32)
    rot = geometry.eulers_to_matrices(np.asarray(eulers_deg, float)).astype(np.float32)
    sig, noise = [], []
    for s in range(0, len(images), chunk):
        sl = slice(s, s + chunk)
        ft = projector.project_ft(vol_ft, jnp.asarray(rot[sl]), jnp.asarray(np.asarray(origins_px, np.float32)[sl]))
        if ctfs is not None:
            ft = ft * jnp.asarray(ctfs[sl])
        v_s, v_n = _fit_signal(jnp.asarray(images[sl]), jnp.real(jnp.fft.ifft2(ft)))
        sig.append(np.asarray(v_s))
        noise.append(np.asarray(v_n))
    snr = float(np.mean(np.concatenate(sig)) / max(np.mean(np.concatenate(noise)), 1e-30))
    return float(np.clip(snr, *SNR_RANGE))


def _render(key, vol_ft: projector.VolumeFT, eulers, ctf_rows, noise_amplitude, snr, max_shift_px, pixel_ang, use_ctf: bool,
            bg_radius_frac: float):
    """Synthetic particles at given poses (n, 3): (images (n, N, N), origins (n, 2) px)."""
    k_shift, k_ctf, k_noise = jax.random.split(key, 3)
    n, box = eulers.shape[0], vol_ft.box
    origins = jax.random.uniform(k_shift, (n, 2), minval=-max_shift_px, maxval=max_shift_px)
    ft = projector.project_ft(vol_ft, geometry.eulers_to_matrices(eulers), origins)
    if use_ctf:
        rows = ctf_rows[jax.random.randint(k_ctf, (n,), 0, ctf_rows.shape[0])]
        ft = ft * ctf_mod.ctf_2d(box, pixel_ang, *(rows[:, i] for i in range(len(CTF_KEYS))))
    clean = jnp.real(jnp.fft.ifft2(ft))
    noise = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(jax.random.normal(k_noise, (n, box, box))) * noise_amplitude))
    noise = noise / jnp.maximum(jnp.std(noise), 1e-30)
    sigma = jnp.std(clean) / jnp.sqrt(snr)
    return normalize_background(clean + sigma * noise, bg_radius_frac), origins


def noise_amplitude(power_per_shell, box: int) -> np.ndarray:
    """(N, N) float32 sqrt of a radial power spectrum (:func:`radial_power`) on the unshifted grid
    (shells beyond its length get its last value; DC 0)."""
    p = np.asarray(power_per_shell, float)
    shells = np.minimum(_shells(box), len(p) - 1)
    amp = np.sqrt(np.maximum(p[shells], 0.0))
    amp[0, 0] = 0.0
    return amp.astype(np.float32)


@flax.struct.dataclass
class Generator:
    """Everything :func:`generate` needs: device arrays (a pytree: it enters jitted training
    steps as an argument) and two static settings. Build it with :func:`generator`."""

    vol_ft: projector.VolumeFT
    ctf_rows: jax.Array  # (m, 8) CTF_KEYS rows of real particles; all zeros: no CTF
    noise_amplitude: jax.Array  # (N, N)
    snr: jax.Array  # ()
    max_shift_px: jax.Array  # ()
    pixel_ang: jax.Array  # ()
    centres: jax.Array  # (R, 3) region centres
    ops: jax.Array  # (G, 3, 3) symmetry operators
    cap_cos: jax.Array  # (R,) cos of each region's largest angle from its centre (a cap holding the region)
    use_ctf: bool = flax.struct.field(pytree_node=False, default=True)
    bg_radius_frac: float = flax.struct.field(pytree_node=False, default=0.75)


def generator(vol_ft: projector.VolumeFT, centres: np.ndarray, ops: np.ndarray, *, pixel_ang: float, ctf_rows: np.ndarray | None,
              noise_power: np.ndarray, snr: float, max_shift_px: float, bg_radius_frac: float = 0.75) -> Generator:
    """A :class:`Generator` of a reference at the working box and pixel (vol_ft).

    centres (R, 3), ops (G, 3, 3): the project's regions.  ctf_rows: :func:`ctf_table` of the real
    particles (None: no CTF).  noise_power: :func:`radial_power` of real particles at the same box.
    snr: :func:`estimate_snr`.  max_shift_px: origins uniform in ±max (x, y)."""
    rows = ctf_rows if ctf_rows is not None else np.zeros((1, len(CTF_KEYS)), np.float32)
    return Generator(vol_ft, jnp.asarray(rows, jnp.float32), jnp.asarray(noise_amplitude(noise_power, vol_ft.box)), jnp.float32(snr),
                     jnp.float32(max_shift_px), jnp.float32(pixel_ang), jnp.asarray(centres, jnp.float32), jnp.asarray(ops, jnp.float32),
                     jnp.asarray(region_caps(centres, ops), jnp.float32), use_ctf=ctf_rows is not None,
                     bg_radius_frac=float(bg_radius_frac))


CAP_SAMPLES = 20000  # sphere directions from which every region's extent is measured
CAP_MARGIN_DEG = 2.0  # beyond the largest sampled angle (the samples are ~1.4° apart)


def region_caps(centres: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """(R,) cos of the angle of a cap about each centre that holds its whole region: the largest
    angle of a region's directions among a Fibonacci sphere of CAP_SAMPLES, plus CAP_MARGIN_DEG."""
    i = np.arange(CAP_SAMPLES) + 0.5
    z = 1 - 2 * i / CAP_SAMPLES
    phi = np.pi * (1 + 5**0.5) * i
    dirs = np.stack([np.sqrt(1 - z**2) * np.cos(phi), np.sqrt(1 - z**2) * np.sin(phi), z], axis=1)
    idx, dist = assign_regions(dirs, centres, ops)
    largest = np.array([dist[idx == r].max(initial=0.0) for r in range(len(centres))])
    return np.cos(np.deg2rad(np.minimum(largest + CAP_MARGIN_DEG, 180.0)))


def region_of(dirs: jax.Array, centres: jax.Array, ops: jax.Array) -> jax.Array:
    """(n,) int32 nearest region of unit directions (n, 3) over the symmetry copies: the traceable
    `regions.assign_regions` (ties to the lower index)."""
    cos = jnp.einsum("gij,nj,ri->nrg", ops, dirs, centres).max(axis=-1)
    return jnp.argmax(cos, axis=1).astype(jnp.int32)


def _directions_in_cap(key: jax.Array, centre: jax.Array, cap_cos: jax.Array, n: int) -> jax.Array:
    """(n, 3) unit directions uniform over the cap {d : d·centre ≥ cap_cos}."""
    k_z, k_phi = jax.random.split(key)
    z = jax.random.uniform(k_z, (n,), minval=cap_cos, maxval=1.0)
    phi = jax.random.uniform(k_phi, (n,), minval=0.0, maxval=2 * jnp.pi)
    helper = jnp.where(jnp.abs(centre[2]) < 0.9, jnp.array([0.0, 0.0, 1.0]), jnp.array([1.0, 0.0, 0.0]))
    u = jnp.cross(centre, helper)
    u = u / jnp.linalg.norm(u)
    v = jnp.cross(centre, u)
    s = jnp.sqrt(jnp.maximum(1 - z**2, 0.0))
    return z[:, None] * centre + (s * jnp.cos(phi))[:, None] * u + (s * jnp.sin(phi))[:, None] * v


def generate(key: jax.Array, gen: Generator, n: int, region: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """n fresh synthetic particles (module docstring), their regions and poses: (images (n, N, N),
    labels (n,) int32, eulers (n, 3) degrees).

    Poses uniform over SO(3); with ``region`` (a traced int), the first half's projection directions
    uniform over the cap that holds that region instead (``cap_cos``), so a per-region net sees
    positives as well as negatives. Labels are always the region of the drawn direction.
    Traceable: called inside training's jitted batch makers, so every step sees new examples."""
    k_pose, k_dir, k_psi, k_rest = jax.random.split(key, 4)
    eulers = random_eulers_deg(k_pose, n)
    if region is not None:
        m = n // 2
        d = _directions_in_cap(k_dir, gen.centres[region], gen.cap_cos[region], m)
        rot, tilt = geometry.direction_to_angles(d)
        psi = jax.random.uniform(k_psi, (m,), minval=-180.0, maxval=180.0)
        eulers = eulers.at[:m].set(jnp.stack([rot, tilt, psi], axis=-1))
    images, _ = _render(k_rest, gen.vol_ft, eulers, gen.ctf_rows, gen.noise_amplitude, gen.snr, gen.max_shift_px, gen.pixel_ang,
                        gen.use_ctf, gen.bg_radius_frac)
    return images, region_of(geometry.eulers_to_matrices(eulers)[:, 2, :], gen.centres, gen.ops), eulers
