"""PNG plots of results people look at (matplotlib, Agg backend), written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io.atomic import atomic_write  # noqa: E402


def save(fig, path: Path) -> Path:
    """Write a figure to `path` (PNG) atomically and close it."""
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def region_counts(path: Path, counts: np.ndarray, centres_rot_tilt: np.ndarray, min_count: int, title: str) -> Path:
    """Bar chart of particles per region and a map of the region centres coloured by count."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = ["tab:red" if c < min_count else "tab:blue" for c in counts]
    a.bar(np.arange(len(counts)), counts, color=colors)
    a.axhline(min_count, color="tab:red", ls="--", lw=1, label=f"warning below {min_count}")
    a.set_xlabel("region")
    a.set_ylabel("labelled particles")
    a.legend(loc="upper right", fontsize=8)
    sc = b.scatter(centres_rot_tilt[:, 0], centres_rot_tilt[:, 1], c=counts, s=60, cmap="viridis")
    for i, (r, t) in enumerate(centres_rot_tilt):
        b.annotate(str(i), (r, t), fontsize=6, ha="center", va="bottom")
    b.set_xlim(-180, 180)
    b.set_ylim(180, 0)
    b.set_xlabel("rot (°)")
    b.set_ylabel("tilt (°)")
    fig.colorbar(sc, ax=b, label="particles")
    fig.suptitle(title)
    return save(fig, path)


def angular_distribution(path: Path, rot_deg: np.ndarray, tilt_deg: np.ndarray, title: str) -> Path:
    """2D histogram of projection directions (rot, tilt)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    h = ax.hist2d(rot_deg, tilt_deg, bins=[36, 18], range=[[-180, 180], [0, 180]], cmap="magma")
    ax.set_ylim(180, 0)
    ax.set_xlabel("rot (°)")
    ax.set_ylabel("tilt (°)")
    fig.colorbar(h[3], ax=ax, label="particles")
    ax.set_title(title)
    return save(fig, path)


def histogram(path: Path, values: np.ndarray, xlabel: str, title: str, bins: int = 50, vline: float | None = None) -> Path:
    """Histogram of the finite `values`. In float64: float32 values spread over fewer than `bins`
    representable steps (e.g. the top probabilities of barely trained nets, all ≈ 0.5) make
    numpy refuse the bins ("Too many bins for data range")."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = np.asarray(values, np.float64)
    ax.hist(values[np.isfinite(values)], bins=bins, color="tab:blue")
    if vline is not None:
        ax.axvline(vline, color="tab:red", ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("particles")
    ax.set_title(title)
    return save(fig, path)


def coverage_curve(path: Path, mean_kept: np.ndarray, hit: np.ndarray, target: float, chosen: tuple[float, float] | None,
                   n_regions: int, title: str) -> Path:
    """Share of held-out particles whose true region is kept against the mean number of regions
    kept, over the cumulative-probability rule's p; the target coverage and the chosen point."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(mean_kept, hit, color="tab:blue", marker=".", ms=3, label="held-out labelled particles")
    ax.axhline(target, color="tab:red", ls="--", label=f"target {target:g}")
    if chosen is not None:
        ax.plot(*chosen, "o", color="tab:red", label=f"chosen: {chosen[0]:.1f} regions")
    ax.set_xlim(0.8, n_regions + 0.2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"mean regions kept per particle (of {n_regions})")
    ax.set_ylabel("true region kept")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)


def training_curves(path: Path, df) -> Path:
    """Per-region train/validation loss and accuracy per epoch (thin lines) and their mean (thick)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric in zip(axes, ("loss", "acc")):
        for col, color in ((f"train_{metric}", "tab:blue"), (f"val_{metric}", "tab:orange")):
            if df.empty or df[col].isna().all():
                continue
            for _, g in df.groupby("region"):
                ax.plot(g["epoch"] + 1, g[col], color=color, alpha=0.15, lw=0.8)
            mean = df.groupby("epoch")[col].mean()
            ax.plot(mean.index + 1, mean.values, color=color, lw=2.5, label=f"{col.split('_')[0]} (mean over regions)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("balanced " + ("accuracy" if metric == "acc" else "BCE loss"))
        ax.legend(fontsize=8)
    fig.suptitle(f"region classifiers: {df['region'].nunique() if not df.empty else 0} regions")
    return save(fig, path)


def cumulative_errors(path: Path, curves: dict, title: str) -> Path:
    """Cumulative distribution of angular errors per aligned set, 5° and 10° marked."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, err in curves.items():
        e = np.sort(np.asarray(err))
        ax.plot(e, 100 * np.arange(1, e.size + 1) / e.size, label=f"{label} (median {np.median(e):.1f}°)")
    for v in (5, 10):
        ax.axvline(v, color="grey", ls="--", lw=0.8)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, 180)
    ax.set_xlabel("angular error (°)")
    ax.set_ylabel("% of particles")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return save(fig, path)


def fsc_curve(path: Path, freqs_per_ang: np.ndarray, curve: np.ndarray, resolution_ang: float, title: str, threshold: float = 0.143) -> Path:
    """Half-map FSC against spatial frequency, with the threshold line and the resolution."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(freqs_per_ang[1:], curve[1:], lw=1.5, color="tab:blue")
    ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"FSC = {threshold}")
    ax.axvline(1.0 / resolution_ang, color="tab:gray", ls=":", lw=1, label=f"{resolution_ang:.1f} Å")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC (half maps)")
    ax.set_ylim(min(-0.1, float(np.min(curve[1:]))), 1.05)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    return save(fig, path)


def resolution_per_iteration(path: Path, iterations: np.ndarray, resolution_ang: np.ndarray, box_px: np.ndarray, title: str) -> Path:
    """Half-map resolution (FSC 0.143) per refinement iteration, with the working box of each."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(iterations, resolution_ang, "o-", color="tab:blue", lw=1.5)
    for i, r, b in zip(iterations, resolution_ang, box_px):
        ax.annotate(f"{int(b)} px", (i, r), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("iteration (0: the input poses)")
    ax.set_ylabel("resolution (Å, FSC 0.143)")
    ax.set_xticks(iterations)
    ax.invert_yaxis()
    ax.set_title(title)
    return save(fig, path)
