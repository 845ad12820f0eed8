"""Gold-standard local refinement (`refine`): poses refined past the working box, to the
resolution the data support (the paper's last step, done there with Xmipp highres).

Gold standard. The particles are split into two half sets once; each half is searched only
against a reference reconstructed from its own particles, so the two half maps are independent
and their FSC measures the resolution honestly. The halves share only the Fourier coefficients
below a low join resolution (:func:`join_halves`, as RELION's ``--low_resol_join_halves``), which
keeps their hands and origins the same without sharing any detail.

One iteration (``commands/refine.py`` runs the loop):
1. :func:`iteration_geometry` from the last resolution: the working box that holds it (pixel =
   resolution / 3, the paper's, never shrinking, up to the full box), the score's band, the
   angular step (Crowther: atan(resolution / diameter)) and the search radius around each pose;
2. each half's reference: its last reconstruction, joined at low resolution and weighted by the
   half-set FSC (:func:`half_references`: w = sqrt(2·FSC / (1 + FSC)), the expected correlation
   of a half map with the truth — noisy shells count for what they are worth);
3. :func:`local_search` of every particle around its current pose, against its own half's
   reference: a ball of rotations of radius LOCAL_RADIUS_STEPS steps and a disc of integer
   shifts of ``shift_range_px``, then the coordinate-wise sub-step passes of ``search``;
4. both halves reconstructed from the new poses → FSC → the next resolution.
Stop rule (:func:`converged`): the median pose changed by less than half the angular step, and
either the box has stopped growing and the resolution improved by less than
CONVERGED_RESOLUTION_GAIN, or the resolution reached the full box's Nyquist.
A local search cannot bring back a particle that starts beyond its radius; ``commands/refine.py``
then runs a global pass (``core.alignment``'s exhaustive search, each half against its own map)
and converges locally again.

Everything here is a pure function of arrays; the score is ``core.score``'s band-limited,
CTF-aware normalised cross-correlation.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .consensus import pose_differences
from .gallery import NYQUIST_PX, default_angular_step_deg
from .preprocess import PAPER_PIXEL_PER_RESOLUTION, downsampled_box
from .projector import VolumeFT
from .reconstruction import fsc_weights, shell_filter, shell_index
from .score import phases, pose_scores, weighted_refs
from .search import REFINE_PASSES, refine_poses

JOIN_RESOLUTION_ANG = 40.0  # the halves share only what is coarser than this (RELION's default)
LOCAL_RADIUS_STEPS = 2  # rotations searched up to this many angular steps from the current pose
CONVERGED_RESOLUTION_GAIN = 0.01  # < 1 % better than the last iteration counts as no gain
BAND_BEYOND_RESOLUTION = 1.1  # the score's band reaches 10 % past the current resolution
AT_NYQUIST = 1.03  # a resolution within 3 % of the full box's Nyquist cannot be measured finer


class IterationGeometry(NamedTuple):
    """How one refinement iteration samples poses and frequencies.

    box_px, pixel_ang: the working box and pixel (box·pixel = the particles' box in Å).
    band_resolution_ang: the score's band limit.  angular_step_deg: the local grid's spacing
    (Crowther at the current resolution).  search_radius_deg: rotations up to this far from the
    current pose.  shift_range_px: integer shifts up to this far from the current origin.
    """

    box_px: int
    pixel_ang: float
    band_resolution_ang: float
    angular_step_deg: float
    search_radius_deg: float
    shift_range_px: float


def iteration_geometry(resolution_ang: float, box_in: int, pixel_in_ang: float, diameter_ang: float, shift_range_px: float,
                       min_box: int = 0) -> IterationGeometry:
    """The geometry of the next iteration after a reconstruction at `resolution_ang` (FSC 0.143).

    The box is the even box whose pixel is resolution / 3 (never below min_box, never above
    box_in), so the Nyquist frequency is 1.5× the current resolution: room for the next FSC to
    show an improvement. The band reaches BAND_BEYOND_RESOLUTION past the resolution, capped at
    Nyquist. diameter_ang: the particle's diameter (Crowther's D).
    """
    box = max(min_box, downsampled_box(box_in, pixel_in_ang, resolution_ang / PAPER_PIXEL_PER_RESOLUTION))
    box = min(box, box_in)
    pixel = pixel_in_ang * box_in / box
    band = max(resolution_ang / BAND_BEYOND_RESOLUTION, NYQUIST_PX * pixel)
    step = default_angular_step_deg(resolution_ang, diameter_ang)
    return IterationGeometry(box, pixel, band, step, LOCAL_RADIUS_STEPS * step, shift_range_px)


def split_halves(n: int, key) -> np.ndarray:
    """(n,) int 1/2: a random gold-standard split (RELION's rlnRandomSubset values), sizes n//2 and n − n//2."""
    perm = np.asarray(jax.random.permutation(key, n))
    half = np.ones(n, int)
    half[perm[n // 2 :]] = 2
    return half


# ------------------------------------------------------------------------------ references
def join_halves(half1, half2, pixel_ang: float, join_resolution_ang: float | None = JOIN_RESOLUTION_ANG):
    """(half1, half2) with their Fourier coefficients coarser than join_resolution_ang replaced by the
    two halves' average (None: unchanged)."""
    if not join_resolution_ang:
        return np.asarray(half1, np.float32), np.asarray(half2, np.float32)
    box = np.shape(half1)[0]
    low = shell_index(box) < box * pixel_ang / join_resolution_ang
    f1, f2 = np.fft.fftn(half1), np.fft.fftn(half2)
    mean = 0.5 * (f1 + f2)
    f1, f2 = np.where(low, mean, f1), np.where(low, mean, f2)
    return np.real(np.fft.ifftn(f1)).astype(np.float32), np.real(np.fft.ifftn(f2)).astype(np.float32)


def half_references(half1, half2, fsc_curve, pixel_ang: float, mask=None,
                    join_resolution_ang: float | None = JOIN_RESOLUTION_ANG) -> tuple[np.ndarray, np.ndarray]:
    """Each half's next reference: joined below join_resolution_ang, FSC-weighted
    (:func:`fsc_weights` of the curve between the halves), times the mask (None: no mask)."""
    j1, j2 = join_halves(half1, half2, pixel_ang, join_resolution_ang)
    w = fsc_weights(fsc_curve)
    refs = [shell_filter(j, w) for j in (j1, j2)]
    if mask is not None:
        refs = [r * np.asarray(mask, np.float32) for r in refs]
    return refs[0], refs[1]


def weighted_average(half1, half2, fsc_curve) -> np.ndarray:
    """Both halves' average (N, N, N), FSC-weighted (:func:`fsc_weights`): the map refine makes its
    solvent mask from."""
    return shell_filter(0.5 * (np.asarray(half1, np.float32) + np.asarray(half2, np.float32)), fsc_weights(fsc_curve))


def fourier_resize_volume(vol, new_box: int) -> np.ndarray:
    """A map (N, N, N) resampled to (M, M, M) over the same extent in Å (pixel × N / M) by cropping or
    zero-padding its centred Fourier transform; real-space values (the mean) are kept."""
    vol = np.asarray(vol, np.float32)
    n = vol.shape[0]
    if n == new_box:
        return vol
    ft = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    out = np.zeros((new_box,) * 3, np.complex128)
    m = min(n, new_box)
    src = slice(n // 2 - m // 2, n // 2 - m // 2 + m)
    dst = slice(new_box // 2 - m // 2, new_box // 2 - m // 2 + m)
    out[dst, dst, dst] = ft[src, src, src]
    res = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(out)))
    return (np.real(res) * (new_box / n) ** 3).astype(np.float32)


# ---------------------------------------------------------------------------- local search
def local_rotations(radius_deg: float) -> np.ndarray:
    """Rotations (J, 3, 3) of a ball grid: rotation vectors h·(i, j, k), |(i, j, k)| ≤
    LOCAL_RADIUS_STEPS, h = radius / LOCAL_RADIUS_STEPS; the identity first. With radius 2 steps:
    J = 33 (the identity, 6 at one step, 12 at √2, 8 at √3 and 6 at two steps)."""
    r = LOCAL_RADIUS_STEPS
    g = np.arange(-r, r + 1)
    v = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    v = v[(v**2).sum(-1) <= r * r]
    v = v[np.argsort((v**2).sum(-1), kind="stable")] * np.deg2rad(radius_deg) / r
    theta = np.linalg.norm(v, axis=-1)
    k = v / np.maximum(theta, 1e-12)[:, None]
    kx = np.zeros((len(v), 3, 3))
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    kx[:, 1, 0], kx[:, 2, 0], kx[:, 2, 1] = k[:, 2], -k[:, 1], k[:, 0]
    s, c = np.sin(theta)[:, None, None], np.cos(theta)[:, None, None]
    return (np.eye(3) + s * kx + (1 - c) * kx @ kx).astype(np.float32)  # Rodrigues


def local_shifts(range_px: float) -> np.ndarray:
    """Integer shift offsets (S, 2) (x, y) px with |s| ≤ range_px, (0, 0) first."""
    r = int(np.floor(range_px))
    g = np.arange(-r, r + 1)
    s = np.stack(np.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    s = s[(s**2).sum(-1) <= range_px**2 + 1e-9]
    return s[np.argsort((s**2).sum(-1), kind="stable")].astype(np.float32)


@partial(jax.jit, static_argnames=("refine_passes",))
def local_search(vol_ft: VolumeFT, cf, c2, inorm, rotmats, origins_px, band, rotations, shifts, step_deg,
                 refine_passes: int = REFINE_PASSES):
    """Best pose of each particle near its current one.

    cf, c2, inorm: particle features (``score.particle_features``) of b particles.
    rotmats: (b, 3, 3) current poses.  origins_px: (b, 2) current RELION origins (working px).
    rotations: (J, 3, 3) from :func:`local_rotations` (applied in the image frame, ΔR·A).
    shifts: (S, 2) from :func:`local_shifts` (added to the origin).  step_deg: the grid's spacing;
    the sub-step passes search ±step/2, /4, /8 (``search.refine_poses``).
    Every (rotation, shift) pair of the grid is scored; the identity and the zero shift come
    first, so the current pose is a candidate and the score never decreases.
    Returns (rotmats (b, 3, 3), origins_px (b, 2), score (b,)).
    """
    b, j = cf.shape[0], rotations.shape[0]
    cand = jnp.einsum("jik,bkl->bjil", rotations, rotmats.astype(jnp.float32))  # (b, J, 3, 3)
    rws = weighted_refs(vol_ft, band, cand.reshape(-1, 3, 3)).reshape(b, j, -1)
    cand_shift = origins_px.astype(jnp.float32)[:, None, :] + shifts[None]  # (b, S, 2)
    ncc = pose_scores(cf[:, None, :] * phases(band, cand_shift), rws, c2, inorm).reshape(b, -1)  # (b, J·S)
    best = jnp.argmax(ncc, axis=-1)
    a, q = best // shifts.shape[0], best % shifts.shape[0]
    rot = jnp.take_along_axis(cand, a[:, None, None, None], axis=1)[:, 0]
    origin = jnp.take_along_axis(cand_shift, q[:, None, None], axis=1)[:, 0]
    return refine_poses(vol_ft, cf, c2, inorm, rot, origin, band, step_deg, step_deg, refine_passes=refine_passes)


# ------------------------------------------------------------------------------ stop rule
def converged(history: list[dict], nyquist_ang: float | None = None) -> bool:
    """True when the last iteration changed nothing worth another: the median pose moved by less
    than half its angular step, and either its box did not grow and its resolution is less than
    CONVERGED_RESOLUTION_GAIN better than the one before, or it already reached nyquist_ang (the
    full box's Nyquist, within AT_NYQUIST: no later FSC can show more). history: one dict per
    iteration with box_px, resolution_ang, median_angle_change_deg, angular_step_deg."""
    if len(history) < 2:
        return False
    last, prev = history[-1], history[-2]
    if last["median_angle_change_deg"] >= 0.5 * last["angular_step_deg"]:
        return False
    if nyquist_ang is not None and last["resolution_ang"] <= AT_NYQUIST * nyquist_ang:
        return True
    return last["box_px"] == prev["box_px"] and last["resolution_ang"] > prev["resolution_ang"] * (1 - CONVERGED_RESOLUTION_GAIN)


def global_pass_lost(history: list[dict]) -> bool:
    """True when the last iteration is the first local one after a global pass and its half-set
    resolution is not finer than the iteration before the pass: the pass threw away poses the local
    iterations do not regain (measured on EMD-11007: from the true poses 3.84 Å before, 6.77 Å one
    iteration after; at 10,000 particles 3.57 Å before, 3.83, 3.70, 3.64 Å after — never finer
    within the cap; at 3,000 from align's poses 7.09 Å before, 7.00 Å after, where the pass helps).
    Refine then stops, and writes the iteration before the pass."""
    if len(history) < 3 or history[-1].get("global_pass") or not history[-2].get("global_pass"):
        return False
    return history[-1]["resolution_ang"] >= history[-3]["resolution_ang"]


def moved_elsewhere(eulers_now, eulers_global, ops, radius_deg: float) -> np.ndarray:
    """(n,) bool: the particles a global pass found more than radius_deg (symmetry-aware full
    rotation) from their current pose — beyond what a local search around it reaches. Only these
    take the global pose; the others keep theirs, which is finer than the global search's (align's
    box and step) and which the local iterations would otherwise have to find again.
    eulers_now, eulers_global: (n, 3) RELION degrees.  ops: (G, 3, 3) symmetry operators."""
    return pose_differences(eulers_now, eulers_global, ops, mode="rotation") > radius_deg


def written_iteration(history: list[dict]) -> int:
    """The iteration refine writes: the last one, unless the iteration just before a global pass had
    a finer half-set resolution than the last (then the finest such one). history: one dict per
    iteration (index = iteration) with resolution_ang and, for a global pass, global_pass."""
    best = len(history) - 1
    for h in history[1:]:
        k = h["iteration"] - 1
        if h.get("global_pass") and history[k]["resolution_ang"] < history[best]["resolution_ang"]:
            best = k
    return best
