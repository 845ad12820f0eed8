"""Reference masks: a soft sphere, and a solvent mask made from the map itself.

A reference reconstructed from a few hundred noisy particles carries as much noise in the solvent
around the molecule as in the molecule. Projected, that noise lands on every image pixel and the
score correlates particles with it; multiplying the reference by a mask that is 1 over the
molecule and 0 in the solvent removes it (RELION masks every reference, with a sphere or a user
mask). The mask made from the map (:func:`solvent_mask`) follows the molecule, as the masks users
draw with ``relion_mask_create`` do: the map smoothed to MASK_LOWPASS_ANG, thresholded at
THRESHOLD_SD standard deviations above the solvent (the corners outside the inscribed sphere; at
least THRESHOLD_PEAK_FRACTION of the peak, for maps with noise-free solvent),
extended by MASK_EXTEND_ANG and given a raised-cosine edge of MASK_EDGE_ANG.

Measured (benchmarks/RESULTS.md, "align: a masked reference"): on EMD-11007 particles with real
micrograph noise (SNR 0.03, 30-px working box), the exhaustive search found 78.0 % of held-out
particles within 5° with the FSC-weighted subset reference, 85.0 % with it times a soft sphere and
87.5–88.2 % times this solvent mask (89.9 % with the true map unmasked); on C1 ribosome particles
(SNR 0.05) 89.1 → 97.6 % (a sphere: 97.8 %). Thresholds of 2–3 SD and extensions of 7–14 Å all
scored within 1 point of each other.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MASK_LOWPASS_ANG = 30.0  # the map is smoothed to this before thresholding (never finer than 5 px)
THRESHOLD_SD = 3.0  # molecule: smoothed density above the solvent's mean + this many of its SDs ...
THRESHOLD_PEAK_FRACTION = 0.03  # ... and above this fraction of the peak (noise-free solvent has no SD)
MASK_EXTEND_ANG = 14.0  # the thresholded region grows by this (at least 1 px) ...
MASK_EDGE_ANG = 20.0  # ... and falls to 0 over a raised cosine this wide (at least 2 px)
SOLVENT_RADIUS_FRACTION = 0.45  # the solvent sample: voxels further than this × box from the centre
MIN_COMPONENT_FRACTION = 0.1  # blobs smaller than this × the largest are noise, not molecule


def _radius_px(box: int) -> np.ndarray:
    """(N, N, N) distance of every voxel from the box centre (N // 2), in px."""
    c = np.arange(box) - box // 2
    return np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def soft_sphere(box: int, radius_px: float, edge_px: float = 3.0) -> np.ndarray:
    """(N, N, N) float32 mask: 1 inside radius_px, a raised-cosine edge of width edge_px, 0 outside."""
    t = np.clip((_radius_px(box) - radius_px) / max(edge_px, 1e-6), 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


def _smoothed(vol: np.ndarray, pixel_ang: float) -> np.ndarray:
    """The map with a Gaussian low-pass whose transform is 1/2 at MASK_LOWPASS_ANG (≥ 5 px)."""
    resolution_px = max(MASK_LOWPASS_ANG / pixel_ang, 5.0)
    sigma_px = resolution_px * np.sqrt(2 * np.log(2)) / (2 * np.pi)  # exp(-2π²σ²f²) = 1/2 at f = 1/res
    return ndimage.gaussian_filter(np.asarray(vol, np.float64), sigma_px, mode="wrap")


def solvent_mask(vol, pixel_ang: float) -> np.ndarray:
    """(N, N, N) float32 soft mask of the molecule in the map `vol` at pixel_ang Å/px (see the module).

    Blobs above the threshold that are smaller than MIN_COMPONENT_FRACTION of the largest are
    dropped (noise that passed the threshold). A map with nothing above the threshold (a flat map)
    gets the soft sphere of radius SOLVENT_RADIUS_FRACTION × box instead."""
    vol = np.asarray(vol, np.float64)
    box = vol.shape[0]
    smooth = _smoothed(vol, pixel_ang)
    solvent = smooth[_radius_px(box) > SOLVENT_RADIUS_FRACTION * box]
    floor = solvent.mean()
    molecule = smooth > floor + max(THRESHOLD_SD * solvent.std(), THRESHOLD_PEAK_FRACTION * (smooth.max() - floor))
    labels, n = ndimage.label(molecule)
    edge_px = max(MASK_EDGE_ANG / pixel_ang, 2.0)
    if n == 0:
        return soft_sphere(box, SOLVENT_RADIUS_FRACTION * box - edge_px, edge_px)
    sizes = ndimage.sum(molecule, labels, np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= MIN_COMPONENT_FRACTION * sizes.max()) + 1
    molecule = np.isin(labels, keep)
    extend_px = max(int(round(MASK_EXTEND_ANG / pixel_ang)), 1)
    molecule = ndimage.binary_dilation(molecule, ndimage.generate_binary_structure(3, 1), iterations=extend_px)
    dist = ndimage.distance_transform_edt(~molecule)  # px from the extended molecule (0 inside)
    t = np.clip(dist / edge_px, 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)
