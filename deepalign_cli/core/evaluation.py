"""Accuracy measures against a known truth (simulated data, or a trusted reference alignment)."""

from __future__ import annotations

import numpy as np

from . import geometry, regions
from .consensus import pose_differences


def region_hit_rates(probs: np.ndarray, true_region: np.ndarray, ks=(1, 2, 3)) -> dict[int, float]:
    """Fraction of particles whose true region is among the k most probable ones, per k.
    probs: (n, R); true_region: (n,) int."""
    order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
    return {int(k): float((order[:, :k] == np.asarray(true_region)[:, None]).any(axis=1).mean()) for k in ks if k <= probs.shape[1]}


def true_regions(eulers_deg: np.ndarray, centres: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """Region index (n,) of each pose's projection direction."""
    d = geometry.projection_direction(eulers_deg[:, 0], eulers_deg[:, 1])
    return regions.assign_regions(d, centres, ops)[0]


def angular_error_summary(eulers_est: np.ndarray, eulers_true: np.ndarray, ops: np.ndarray) -> dict:
    """Full-rotation error (degrees, minimised over symmetry) statistics: median, 90th percentile,
    % within 5° and 10°, and the per-particle errors."""
    err = pose_differences(eulers_est, eulers_true, ops, mode="rotation")
    return {
        "n": int(err.size),
        "median_deg": float(np.median(err)),
        "p90_deg": float(np.percentile(err, 90)),
        "within_5_pct": float(100 * np.mean(err <= 5)),
        "within_10_pct": float(100 * np.mean(err <= 10)),
        "errors_deg": err,
    }


def shift_error_px(origins_est_ang: np.ndarray, origins_true_ang: np.ndarray, pixel_ang: float) -> np.ndarray:
    return np.linalg.norm((np.asarray(origins_est_ang) - np.asarray(origins_true_ang)) / pixel_ang, axis=1)
