"""Simulated particle stacks: random poses, shifts and CTFs, projected from a map, plus noise.

Image model, per particle i (RELION conventions, see ``projector``):

    image_i = IFT[ CTF_i · S(-origin_i) · crop_M( P̂(A_i) ) ] + noise

P̂ is the Fourier-slice projection, crop_M keeps the M = ``box`` lowest frequencies
(``project_ft(..., out_box=M)``; output pixel = pixel_size · N / M), S translates by −origin (the
STAR origin, in output pixels) and CTF_i is RELION's ``ctf_2d``. The noise has σ² =
var(clean images)/snr; var is measured once, over the first chunk (up to ``chunk`` clean
particles), and the same σ is used for the whole stack. It is white Gaussian by default, or crops
of a real micrograph (`micrograph_noise`): real ice, the micrograph's own CTF and neighbouring
particles, a coloured spectrum far closer to real data than white noise. Crops of one micrograph
overlap, so that noise is not independent between particles: half-map FSCs of many such
particles are optimistic.

Poses are uniform over SO(3): projection direction uniform on the sphere (rot uniform in
[-180, 180), cos(tilt) uniform in [-1, 1]) and psi uniform in [-180, 180).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from deepalign_cli.core import ctf as ctf_mod
from deepalign_cli.core import geometry, projector


def random_eulers_deg(key, n: int):
    """(n, 3) [rot, tilt, psi] degrees uniform over SO(3); rot, psi in [-180, 180), tilt in [0, 180]."""
    k_rot, k_tilt, k_psi = jax.random.split(key, 3)
    rot = jax.random.uniform(k_rot, (n,), minval=-180.0, maxval=180.0)
    tilt = jnp.rad2deg(jnp.arccos(jax.random.uniform(k_tilt, (n,), minval=-1.0, maxval=1.0)))
    psi = jax.random.uniform(k_psi, (n,), minval=-180.0, maxval=180.0)
    return jnp.stack([rot, tilt, psi], axis=-1)


def _draw_params(key, n, defocus_range_ang, astigmatism_ang, max_shift_px):
    """Random eulers (n, 3) deg, origins (n, 2) px, defocus U/V (n,) Å and angle (n,) deg."""
    k_eul, k_sh, k_def, k_ast, k_ang = jax.random.split(key, 5)
    eulers = random_eulers_deg(k_eul, n)
    origins = jax.random.uniform(k_sh, (n, 2), minval=-max_shift_px, maxval=max_shift_px)
    mean_def = jax.random.uniform(k_def, (n,), minval=defocus_range_ang[0], maxval=defocus_range_ang[1])
    ast = jax.random.uniform(k_ast, (n,), minval=0.0, maxval=astigmatism_ang)
    angle = jax.random.uniform(k_ang, (n,), minval=0.0, maxval=180.0)
    return eulers, origins, mean_def + 0.5 * ast, mean_def - 0.5 * ast, angle


@partial(jax.jit, static_argnames=("box", "use_ctf"))
def _clean_chunk(vol_ft, eulers, origins, du, dv, angle, pixel_out_ang, optics, box, use_ctf):
    """(c, box, box) float32 noise-free particle images for one chunk."""
    rot = geometry.eulers_to_matrices(eulers)
    ft = projector.project_ft(vol_ft, rot, origins, out_box=box)
    if use_ctf:
        voltage_kv, cs_mm, amplitude_contrast, bfactor_ang2 = optics
        ft = ft * ctf_mod.ctf_2d(box, pixel_out_ang, du, dv, angle, voltage_kv, cs_mm, amplitude_contrast, bfactor_ang2)
    return jnp.real(jnp.fft.ifft2(ft)).astype(jnp.float32)


def resample_micrograph(micrograph, pixel_in_ang: float, pixel_out_ang: float) -> np.ndarray:
    """A micrograph (H, W) Fourier-resampled from pixel_in to pixel_out Å/px (crop to coarsen,
    zero-pad to refine), so that its noise spectrum lands on the particles' frequencies.
    Returns (round(H·in/out), round(W·in/out)) float32 (unchanged within 0.1 %)."""
    mic = np.asarray(micrograph, np.float32)
    if abs(pixel_in_ang / pixel_out_ang - 1.0) < 1e-3:
        return mic
    h, w = mic.shape
    nh, nw = (max(2, int(round(d * pixel_in_ang / pixel_out_ang))) for d in (h, w))
    ft = np.fft.fftshift(np.fft.fft2(mic))
    out = np.zeros((nh, nw), np.complex64)
    ch, cw = min(h, nh), min(w, nw)  # the central ch × cw frequencies survive
    out[nh // 2 - ch // 2 : nh // 2 - ch // 2 + ch, nw // 2 - cw // 2 : nw // 2 - cw // 2 + cw] = \
        ft[h // 2 - ch // 2 : h // 2 - ch // 2 + ch, w // 2 - cw // 2 : w // 2 - cw // 2 + cw]
    return np.real(np.fft.ifft2(np.fft.ifftshift(out))).astype(np.float32) * (nh * nw) / (h * w)


@partial(jax.jit, static_argnames=("n", "box"))
def micrograph_noise(key, micrograph, n: int, box: int):
    """(n, box, box) float32 noise images cut from a real micrograph (H, W) ≥ box: each at a
    uniform random position, turned by a random multiple of 90° and mirrored with probability ½
    (the micrograph's 8 symmetries of the square, so few crops repeat), then normalised to mean 0
    and standard deviation 1 (the caller scales it to the SNR)."""
    h, w = micrograph.shape
    k_y, k_x, k_rot, k_flip = jax.random.split(key, 4)
    ys = jax.random.randint(k_y, (n,), 0, h - box + 1)
    xs = jax.random.randint(k_x, (n,), 0, w - box + 1)
    crops = jax.vmap(lambda y, x: jax.lax.dynamic_slice(micrograph, (y, x), (box, box)))(ys, xs).astype(jnp.float32)
    turns = jax.random.randint(k_rot, (n,), 0, 4)
    crops = jnp.stack([jnp.rot90(crops, k, axes=(1, 2)) for k in range(4)])[turns, jnp.arange(n)]
    crops = jnp.where(jax.random.bernoulli(k_flip, 0.5, (n,))[:, None, None], crops[:, :, ::-1], crops)
    crops = crops - crops.mean(axis=(1, 2), keepdims=True)
    return crops / jnp.maximum(crops.std(axis=(1, 2), keepdims=True), 1e-12)


def simulate_particles(
    key,
    vol,
    n: int,
    pixel_size_ang: float,
    *,
    snr: float,
    defocus_range_ang=(10000.0, 25000.0),
    astigmatism_ang: float = 500.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor_ang2: float = 0.0,
    max_shift_px: float = 0.0,
    ctf: bool = True,
    box: int | None = None,
    chunk: int = 256,
    noise_micrograph=None,
) -> dict:
    """Simulate n particle images of a map with random poses, origins, CTFs and noise.

    key: jax PRNG key.  vol: (N, N, N) float map, voxel ``pixel_size_ang`` Å.
    snr: var(signal)/σ² (see module docstring); ``float('inf')`` gives clean images.
    defocus_range_ang: (lo, hi) Å for the mean defocus; astigmatism_ang: max |U - V| in Å.
    max_shift_px: origins uniform in [-max, max] output pixels (x and y).
    box: output box M ≤ N (Fourier crop), default N.  chunk: particles per compiled batch
        (bounds memory; 10⁴ particles at 64 px need ~170 MB for the output only).
    noise_micrograph: None (white Gaussian noise) or a (H, W) micrograph at the output pixel size
        (`resample_micrograph`), H, W ≥ M, whose crops are the noise (`micrograph_noise`).
    Returns dict of numpy arrays: images (n, M, M) float32, eulers_deg (n, 3), origins_px (n, 2)
    (RELION OriginX/Y in output pixels), defocus_u_ang, defocus_v_ang, defocus_angle_deg (n,),
    and pixel_size_ang (float, output pixel size).
    """
    vol = jnp.asarray(vol, jnp.float32)
    n_box = vol.shape[0]
    box = n_box if box is None else int(box)
    mic = None if noise_micrograph is None else jnp.asarray(noise_micrograph, jnp.float32)
    if mic is not None and min(mic.shape) < box:
        raise ValueError(f"noise micrograph {mic.shape[1]}×{mic.shape[0]} px is smaller than the {box}-px box")
    pixel_out = float(pixel_size_ang) * n_box / box
    k_par, k_noise = jax.random.split(key)
    eulers, origins, du, dv, angle = _draw_params(k_par, n, defocus_range_ang, astigmatism_ang, max_shift_px)
    vol_ft = projector.prepare_volume(vol)
    optics = jnp.asarray([voltage_kv, cs_mm, amplitude_contrast, bfactor_ang2], jnp.float32)
    chunk = max(1, min(int(chunk), n))
    images = np.empty((n, box, box), np.float32)
    sigma = 0.0
    for c, start in enumerate(range(0, n, chunk)):
        stop = min(start + chunk, n)
        sel = np.arange(start, start + chunk).clip(max=n - 1)  # pad the last chunk: one compilation
        clean = _clean_chunk(
            vol_ft, eulers[sel], origins[sel], du[sel], dv[sel], angle[sel], pixel_out, optics, box, bool(ctf)
        )[: stop - start]
        if c == 0 and np.isfinite(snr):
            sigma = float(jnp.sqrt(jnp.var(clean) / snr))
        k_c = jax.random.fold_in(k_noise, c)
        if mic is None:
            noise = jax.random.normal(k_c, (chunk, box, box), jnp.float32)[: stop - start]
        else:
            noise = micrograph_noise(k_c, mic, chunk, box)[: stop - start]
        images[start:stop] = np.asarray(clean + sigma * noise)
    return {
        "images": images,
        "eulers_deg": np.asarray(eulers, np.float64),
        "origins_px": np.asarray(origins, np.float64),
        "defocus_u_ang": np.asarray(du, np.float64),
        "defocus_v_ang": np.asarray(dv, np.float64),
        "defocus_angle_deg": np.asarray(angle, np.float64),
        "pixel_size_ang": pixel_out,
    }
