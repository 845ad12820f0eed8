"""Probability of every particle for every region; keep each particle's best regions.

Examples:

    deepalign predict demo                       # top-2 regions (the paper's choice)
    deepalign predict ribo --top-k 3
    deepalign predict ribo --cumulative-p 0.9    # keep regions until 90 % of the probability mass

The rule is either a fixed number (--top-k, default 2) or a cumulative probability mass
(--cumulative-p p: regions in descending probability until their share of the particle's total
reaches p; at least one). Streams the project's particles (memory-mapped, chunked to
--memory-budget-gb) through every region net. Writes PROJECT/predict/probabilities.npy
(particles × regions, float32), predictions.star (the particles with rlnDeepAlignRegions = "3,17",
rlnDeepAlignRegion1 and rlnDeepAlignProb1) and top1_prob.png.
"""

from __future__ import annotations

import io as _io
import time
from pathlib import Path

import numpy as np
import typer

from .. import host_malloc, plots
from ..errors import DeepAlignError
from ..io import checkpoints as ckpt
from ..io import star
from ..io.atomic import staged_dir
from ..io.project import Project
from ..particles import ParticleSource, check_against_project
from ..regionspec import format_regions
from ._common import CONFIG_OPT, FORCE_OPT, PROJECT_ARG, Timer, check_can_run, console, progress, stage_config
from .train import n_regions_of

FLAT_FRACTION = 0.25  # a cumulative rule keeping more than this share of the regions: the nets say little


def load_models(train_dir: Path, n_regions: int) -> dict:
    have = set(ckpt.existing_regions(train_dir))
    missing = sorted(set(range(n_regions)) - have)
    if missing:
        raise DeepAlignError(f"{train_dir}: no checkpoint for region(s) {format_regions(missing)}; "
                             f"run deepalign train --regions {format_regions(missing)}")
    return {r: ckpt.read_entry(ckpt.region_file(train_dir, r)) for r in range(n_regions)}


def command(
    project: Path = PROJECT_ARG,
    top_k: int = typer.Option(None, "--top-k", "-k", help="keep this many regions per particle (default 2)", show_default=False),
    cumulative_p: float = typer.Option(None, "--cumulative-p", help="instead of --top-k: keep regions until this probability mass", show_default=False),
    memory_budget_gb: float = typer.Option(None, "--memory-budget-gb", show_default=False),
    config: Path = CONFIG_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Probabilities of every particle for every region; keep the top-k."""
    from ..core import training

    cfg, pc = stage_config(config, "predict", top_k=top_k, cumulative_p=cumulative_p, memory_budget_gb=memory_budget_gb)
    proj = Project.open(project)
    proj.require_done("train")
    check_can_run(proj, "predict", force)
    host_malloc.share_one_arena(proj.stage("train").get("box") or 0)  # before JAX starts its threads (loading the nets starts them)
    n_regions = n_regions_of(proj)
    models = load_models(proj.root / "train", n_regions)
    trained = [r for r in range(n_regions) if models[r].get("params") is not None]
    if not trained:
        raise DeepAlignError(f"{proj.root / 'train'}: every region was skipped in training; nothing to predict with")
    skipped = sorted(set(range(n_regions)) - set(trained))
    if skipped:
        console.print(f"[yellow]warning:[/yellow] region(s) {format_regions(skipped)} were skipped in training: probability 0")

    particles_star = proj.particles_star
    table = star.read_particles(particles_star)
    src = ParticleSource(table, cfg.preprocess)
    check_against_project(src, proj, particles_star)
    train_box = proj.stage("train").get("box")
    if train_box is not None and train_box != src.box:
        raise DeepAlignError(f"{particles_star}: prepared images are {src.box} px but the nets were trained at {train_box} px; use the same preprocess config")

    n = len(src)
    probs = np.zeros((n, n_regions), np.float32)
    chunk = min(src.chunk_size(pc.memory_budget_gb), 8192)
    use = {r: models[r] for r in trained}
    with progress() as bar, Timer() as t:
        task = bar.add_task(f"predict {len(trained)} regions", total=n, rate="")
        t0 = time.perf_counter()
        for idx, images in src.iter_chunks(chunk):
            probs[idx[:, None], np.asarray(trained)[None, :]] = training.predict_probs(use, images, pc.batch_size, memory_budget_gb=pc.memory_budget_gb)
            done = idx[-1] + 1
            bar.update(task, completed=done, rate=f"{done * len(trained) / max(time.perf_counter() - t0, 1e-9):,.0f} particle·region/s")

    if pc.cumulative_p is not None:
        keep = training.top_k_regions(probs, cumulative_p=pc.cumulative_p)
    else:
        keep = training.top_k_regions(probs, k=pc.top_k)
    out = table.copy()
    out.particles["rlnDeepAlignRegions"] = [",".join(str(int(r)) for r in k) for k in keep]
    out.particles["rlnDeepAlignRegion1"] = [int(k[0]) for k in keep]
    out.particles["rlnDeepAlignProb1"] = np.round(probs[np.arange(n), [int(k[0]) for k in keep]], 5)
    with staged_dir(proj.root / "predict") as tmp:
        buf = _io.BytesIO()
        np.save(buf, probs)
        (tmp / "probabilities.npy").write_bytes(buf.getvalue())
        star.write_particles(tmp / "predictions.star", out)
        plots.histogram(tmp / "top1_prob.png", probs.max(axis=1), "probability of the top region",
                        f"{n} particles, {len(trained)} region nets")
    pdir = proj.root / "predict"
    rate = n * len(trained) / max(t.seconds, 1e-9)
    proj.mark_done("predict", outputs=[pdir / "probabilities.npy", pdir / "predictions.star", pdir / "top1_prob.png"],
                   seconds=t.seconds, config=pc, particle_regions_per_s=round(rate, 1))
    mean_k = np.mean([len(k) for k in keep])
    console.print(f"[green]predicted[/green] {n} particles × {len(trained)} regions in {t.seconds:.1f} s ({rate:,.0f} particle·region/s); "
                  f"{mean_k:.2f} regions kept per particle → {pdir}/predictions.star")
    if pc.cumulative_p is not None and mean_k > FLAT_FRACTION * len(trained):
        console.print(f"[yellow]warning:[/yellow] flat probabilities: --cumulative-p {pc.cumulative_p} keeps {mean_k:.1f} of "
                      f"{len(trained)} regions per particle, so align's search is barely narrowed (particles whose regions "
                      "cost as much as the asymmetric unit are searched over all of it). More labelled particles or "
                      "training sharpen the nets; `align --exhaustive` skips them.", highlight=False)
