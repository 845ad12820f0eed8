"""Calibrated coverage: how many regions to keep so that the true one is kept for a chosen share.

Beyond the paper. Its top-k rule (k = 2) trusts the region nets: where they are confidently
wrong (low SNR, few labelled particles) the true region is dropped and restricted alignment
cannot find the pose. `deepalign predict --coverage 0.95` instead picks the cumulative
probability p of the cumulative rule (`top_k_regions`) from labelled particles the nets
did not train on (the training run's validation split), by split conformal prediction with the
"adaptive prediction sets" score of Romano, Sesia & Candès (NeurIPS 2020) with its random
term set to 0:

* score of a held-out particle = the share of its probability mass in the regions ranked above
  its true region (the smallest p at which the cumulative rule keeps the true region; the rule's
  kept sets grow with p, so "kept" is exactly "score ≤ p");
* p = the ⌈(n + 1)·c⌉-th smallest of the n scores.

If the held-out particles and the rest are exchangeable (the labelled subset is a random ~10 %
of the particles), a new particle's kept regions contain its true region with probability ≥ c,
whatever the nets' quality: sharp nets give small sets, nets at chance give nearly all regions
(and align then searches the whole asymmetric unit, the safe fallback). Caveat: the validation
split also picked the best training epoch, which can make the guarantee slightly optimistic.

Pure functions on arrays.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import DeepAlignError


_TOL = 1e-12  # the cumulative rule keeps a region while the share before it is below p − _TOL


def ranked_shares(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, cumulative share) per particle (both (n, R)): region columns in descending
    probability, and the share of the particle's total probability up to each of them."""
    probs = np.asarray(probs, np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    share = np.cumsum(sorted_p, axis=1) / np.maximum(sorted_p.sum(axis=1, keepdims=True), np.finfo(float).tiny)
    return order, share


def kept_counts(share: np.ndarray, cumulative_p: float) -> np.ndarray:
    """Regions the cumulative rule keeps per particle (n,): in descending order until their share
    reaches p, at least one. share: (n, R) from `ranked_shares`."""
    return np.minimum((share < cumulative_p - _TOL).sum(axis=1) + 1, share.shape[1])


def _true_positions(order: np.ndarray, true_region: np.ndarray) -> np.ndarray:
    return np.argmax(order == np.asarray(true_region, np.int64)[:, None], axis=1)


def scores(probs: np.ndarray, true_region: np.ndarray) -> np.ndarray:
    """Conformity score (n,) of each held-out particle: the smallest p for which the cumulative
    rule keeps its true region — the share of probability in the regions ranked above it (plus
    the rule's tolerance). probs: (n, R); true_region: (n,) int column indices."""
    order, share = ranked_shares(probs)
    pos = _true_positions(order, true_region)
    rows = np.arange(len(pos))
    before = np.where(pos > 0, share[rows, np.maximum(pos - 1, 0)], 0.0)
    return before + 2 * _TOL


def calibrated_p(held_out_scores: np.ndarray, coverage: float) -> float:
    """The cumulative probability p giving ≥ `coverage` of true regions kept (split conformal).

    Returns inf (keep every region) when there are too few held-out particles to certify that
    coverage: ⌈(n + 1)·c⌉ > n (see `min_held_out`)."""
    if not 0 < coverage < 1:
        raise DeepAlignError(f"coverage: {coverage} is not between 0 and 1")
    s = np.sort(np.asarray(held_out_scores, np.float64))
    rank = math.ceil((s.size + 1) * coverage - 1e-9)  # tolerance: (n + 1)·c is an integer at n = min_held_out
    if rank > s.size:
        return math.inf
    return float(s[rank - 1])


def min_held_out(coverage: float) -> int:
    """Fewest held-out particles with which `calibrated_p` certifies `coverage` (with fewer it keeps every region)."""
    return math.ceil(coverage / (1 - coverage) - 1e-9)


def curve(probs: np.ndarray, true_region: np.ndarray, ps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each cumulative p in `ps`: (share of particles whose true region is kept, mean regions kept)."""
    order, share = ranked_shares(probs)
    pos = _true_positions(order, true_region)
    hit, mean_k = [], []
    for p in np.asarray(ps, np.float64):
        k = kept_counts(share, p)
        hit.append(float(np.mean(pos < k)) if len(pos) else math.nan)
        mean_k.append(float(np.mean(k)) if len(k) else math.nan)
    return np.asarray(hit), np.asarray(mean_k)


def calibrate(probs: np.ndarray, true_region: np.ndarray, coverage: float) -> dict:
    """Everything `predict --coverage` reports from the held-out particles' probabilities (n, R)
    and true regions (n,): "p" (`calibrated_p`; inf: keep every region), "cumulative_p" (the
    same, None for inf), the held-out share kept and mean regions kept at p, "min_held_out", the
    "scores", and the trade-off "curve" {p, kept, mean_regions} over a grid of p (for a plot)."""
    s = scores(probs, true_region)
    p = calibrated_p(s, coverage)
    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, 201)[1:], s]))
    hit, mean_k = curve(probs, true_region, grid)
    at_p = curve(probs, true_region, [p]) if len(s) else (np.array([math.nan]), np.array([math.nan]))
    finite = lambda v: float(v) if np.isfinite(v) else None
    return {"coverage": coverage, "n_held_out": int(len(s)), "min_held_out": min_held_out(coverage),
            "p": p, "cumulative_p": finite(p),
            "held_out_kept_at_p": finite(at_p[0][0]), "held_out_mean_regions_at_p": finite(at_p[1][0]),
            "scores": s, "curve": {"p": grid, "kept": hit, "mean_regions": mean_k}}


def top_k_regions(probs: np.ndarray, k: int | None = None, cumulative_p: float | None = None) -> list[np.ndarray]:
    """Per particle, the column indices of its most probable regions, most probable first.

    probs: (n, R).  Exactly one rule: k → the k largest; cumulative_p → regions in descending
    order until their share of the particle's total probability reaches p (at least one).
    Returns a list of n int arrays (length k, or variable for the cumulative rule)."""
    if (k is None) == (cumulative_p is None):
        raise DeepAlignError("top-k: give either k or cumulative_p")
    order, share = ranked_shares(probs)
    if k is not None:
        return list(order[:, : min(int(k), order.shape[1])])
    n_keep = kept_counts(share, cumulative_p)
    return [order[i, : n_keep[i]] for i in range(order.shape[0])]
