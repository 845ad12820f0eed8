"""Train one CNN per region on the labelled subset (the paper's network by default).

Examples:

    deepalign train demo --config configs/demo.yaml
    deepalign train ribo --config configs/ribosome.yaml --regions 0-9      # one SLURM shard
    deepalign train ribo --config configs/ribosome.yaml --resume           # after an interruption

Images are the labelled particles prepared like every stage (Fourier crop to target/3 Å per pixel,
background normalisation). Every region trains in the same run on balanced batches with random
in-plane rotations and shifts; a validation split drives early stopping and the best epoch is kept.
Writes PROJECT/train/region_XXX.msgpack (one self-contained checkpoint per region),
metrics.json, metrics.csv and curves.png; `--regions` trains a subset (shards can run in parallel
and the last one to finish writes the metrics and marks the stage done).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from .. import plots
from ..errors import DeepAlignError
from ..io import checkpoints as ckpt
from ..io import star
from ..io.atomic import atomic_write, write_text_atomic
from ..io.project import Project
from ..particles import ParticleSource, check_against_project
from ..regionspec import format_regions, parse_regions
from ._common import CONFIG_OPT, FORCE_OPT, PROJECT_ARG, Timer, check_can_run, console, progress, stage_config


def n_regions_of(proj: Project) -> int:
    n = proj.stage("label").get("n_regions")
    if n is None:
        raise DeepAlignError(f"{proj.root}: label stage has no region count; rerun deepalign label --force")
    return int(n)


def command(
    project: Path = PROJECT_ARG,
    regions: str = typer.Option(None, "--regions", help="train only these regions, e.g. 0-9,17 (SLURM shards)", show_default=False),
    epochs: int = typer.Option(None, "--epochs", show_default=False),
    images_per_region: int = typer.Option(None, "--images-per-region", show_default=False),
    model: str = typer.Option(None, "--model", help="per_region (paper) or shared_trunk", show_default=False),
    seed: int = typer.Option(None, "--seed", show_default=False),
    resume: bool = typer.Option(False, "--resume", help="continue from the last finished epoch of each region"),
    merge: bool = typer.Option(False, "--merge", help="after SLURM shards: check every region is trained, write metrics, finish the stage"),
    config: Path = CONFIG_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Train one CNN per region on the labelled subset."""
    import jax

    from ..core import training

    cfg, tc = stage_config(config, "train", epochs=epochs, images_per_region=images_per_region, model=model, seed=seed)
    proj = Project.open(project)
    proj.require_done("label")
    n_regions = n_regions_of(proj)
    train_dir = proj.root / "train"
    if merge:
        return merge_shards(proj, train_dir, n_regions, tc)
    check_can_run(proj, "train", force or resume or regions is not None)
    todo = parse_regions(regions, n_regions)
    if tc.model == "shared_trunk" and regions is not None:
        raise DeepAlignError("--regions: the shared-trunk model trains all regions at once; use model: per_region to shard")

    labels_path = proj.root / "label" / "labels.star"
    table = star.read_particles(labels_path)
    src = ParticleSource(table, cfg.preprocess)
    check_against_project(src, proj, labels_path)
    y = table.particles["rlnDeepAlignRegion"].to_numpy(int)
    if y.max(initial=-1) >= n_regions:
        raise DeepAlignError(f"{labels_path}: region {y.max()} but the project has {n_regions} regions; rerun deepalign label --force")
    with Timer() as t_load:
        images = src.read(np.arange(len(src)))

    resume_state = {}
    if resume:
        for r in ([training.SHARED_REGION] if tc.model == "shared_trunk" else todo):
            p = ckpt.resume_file(train_dir, r)
            if p.exists():
                resume_state[r] = ckpt.read_entry(p)

    def save_resume(region, epoch, state):
        ckpt.write_entry(ckpt.resume_file(train_dir, region), state)

    t0 = time.perf_counter()
    n_epochs_total = len(todo) * tc.epochs
    with progress() as bar, Timer() as t:
        task = bar.add_task(f"train {len(todo)} regions @ {src.box} px", total=n_epochs_total, rate="")
        images_seen = [0]

        def on_event(ev):
            if ev["event"] == "skipped":
                bar.console.print(f"[yellow]warning:[/yellow] {ev['warning']}")
                bar.advance(task, tc.epochs)
                return
            images_seen[0] += ev["images"]
            rate = images_seen[0] / max(time.perf_counter() - t0, 1e-9)
            width = n_regions if ev["region"] < 0 else 1
            bar.update(task, advance=width if ev["region"] < 0 else 1,
                       rate=f"{rate:,.0f} img-steps/s  val_acc {ev.get('val_acc') or float('nan'):.3f}")
            if ev.get("stopped") and ev["region"] >= 0:
                bar.advance(task, tc.epochs - 1 - ev["epoch"])

        results = training.train_regions(images, y, todo, tc, jax.random.key(tc.seed), progress=on_event,
                                         resume_state=resume_state or None, checkpoint_cb=save_resume)
    for r, entry in results.items():
        ckpt.write_entry(ckpt.region_file(train_dir, r), {**entry, "region": int(r), "box": src.box, "pixel_ang": src.pixel_ang})
    done = set(ckpt.existing_regions(train_dir))
    proj.update_stage("train", shards_done=sorted(set(proj.stage("train").get("shards_done", [])) | {format_regions(todo)}))
    missing = sorted(set(range(n_regions)) - done)
    console.print(f"[green]trained[/green] regions {format_regions(todo)} in {t.seconds:.1f} s "
                  f"(+{t_load.seconds:.1f} s loading {len(images)} images at {src.box} px)")
    if missing:
        console.print(f"train: {len(missing)} region(s) still to train ({format_regions(missing)}); the stage is done when all are")
        return
    write_metrics(train_dir, n_regions)
    proj.mark_done("train", outputs=[train_dir / "metrics.json", train_dir / "metrics.csv", train_dir / "curves.png"],
                   seconds=t.seconds + t_load.seconds, config=tc, box=src.box, pixel_ang=src.pixel_ang)


def merge_shards(proj: Project, train_dir: Path, n_regions: int, tc) -> None:
    missing = sorted(set(range(n_regions)) - set(ckpt.existing_regions(train_dir)))
    if missing:
        raise DeepAlignError(f"{train_dir}: region(s) {format_regions(missing)} not trained yet; run deepalign train --regions {format_regions(missing)}")
    write_metrics(train_dir, n_regions)
    seconds = proj.stage("train").get("seconds")
    proj.mark_done("train", outputs=[train_dir / "metrics.json", train_dir / "metrics.csv", train_dir / "curves.png"], seconds=seconds, config=tc,
                   box=ckpt.read_entry(ckpt.region_file(train_dir, 0)).get("box"), pixel_ang=ckpt.read_entry(ckpt.region_file(train_dir, 0)).get("pixel_ang"))
    console.print(f"[green]merged[/green] {n_regions} region checkpoints → {train_dir}/metrics.json")


def write_metrics(train_dir: Path, n_regions: int) -> None:
    """metrics.json / metrics.csv / curves.png over all region checkpoints."""
    rows, summary = [], {}
    for r in range(n_regions):
        e = ckpt.read_entry(ckpt.region_file(train_dir, r))
        hist = e.get("history") or []
        best = next((h for h in hist if h["epoch"] == e.get("best_epoch")), None)
        summary[r] = {"best_epoch": e.get("best_epoch"), "warning": e.get("warning"),
                      "val_loss": None if best is None else best.get("val_loss"), "val_acc": None if best is None else best.get("val_acc")}
        rows += [{"region": r, **h} for h in hist]
    df = pd.DataFrame(rows, columns=["region", "epoch", "train_loss", "train_acc", "val_loss", "val_acc"])
    write_text_atomic(train_dir / "metrics.json", json.dumps({"regions": summary}, indent=1, default=float))
    with atomic_write(train_dir / "metrics.csv") as tmp:
        df.to_csv(tmp, index=False)
    plots.training_curves(train_dir / "curves.png", df)
