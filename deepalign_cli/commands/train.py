"""Train one CNN per region on the labelled subset (the paper's network by default).

Examples:

    deepalign train demo --config configs/demo.yaml
    deepalign train ribo --config configs/ribosome.yaml --regions 0-9      # one SLURM shard
    deepalign train ribo --config configs/ribosome.yaml --resume           # after an interruption
    deepalign train ribo --model polar_trunk --synthetic-fraction 0.9      # + examples made from the reference

Images are the labelled particles prepared like every stage (Fourier crop to target/3 Å per pixel,
background normalisation). Every region trains in the same run on balanced batches with random
in-plane rotations and shifts; a validation split drives early stopping and the best epoch is kept.
With train.synthetic_fraction f > 0, that share of every training batch is made on the fly, inside
the jitted batch maker, from the reference (align's: --reference, else
PROJECT/reconstruct/reference/map.mrc, else the labelled subset's map) with real particles' CTFs, the
data's shift range and noise spectrum at the measured SNR (core/synthetic.py): new examples every
step, none kept in memory. Validation and predict's --coverage calibration stay on real particles.
Writes PROJECT/train/region_XXX.msgpack (one self-contained checkpoint per region),
metrics.json, metrics.csv and curves.png; `--regions` trains a subset (shards can run in parallel
and the last one to finish writes the metrics and marks the stage done).

Interruption: after every region-epoch the region's training state is saved (atomically) to
PROJECT/train/resume/region_XXX.msgpack. Ctrl-C or SIGTERM (a SLURM time limit) stops with exit
code 130 and "interrupted; rerun with --resume"; `--resume` skips regions whose final checkpoint was
written with the same settings and continues the others from their last saved epoch, giving the same
weights as an uninterrupted run. Saved states carry a digest of the settings that shape the result
(train and preprocess config, labels.star); `--resume` with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from .. import host_malloc, plots
from ..errors import DeepAlignError
from ..io import checkpoints as ckpt
from ..io import star
from ..io.atomic import atomic_write, write_text_atomic
from ..io.project import Project
from ..particles import ParticleSource, check_against_project
from ..regionspec import format_regions, parse_regions
from ..core.split import validation_digest, validation_split
from ._common import (CONFIG_OPT, FORCE_OPT, PROJECT_ARG, Timer, check_can_run, console, exit_on_interrupt, progress,
                      settings_digest, stage_config)


SETTINGS_KEY = "settings"  # digest stored in resume states and final region checkpoints


def command(
    project: Path = PROJECT_ARG,
    regions: str = typer.Option(None, "--regions", help="train only these regions, e.g. 0-9,17 (SLURM shards)", show_default=False),
    epochs: int = typer.Option(None, "--epochs", show_default=False),
    images_per_region: int = typer.Option(None, "--images-per-region", show_default=False),
    model: str = typer.Option(None, "--model", help="per_region (paper) or polar_trunk", show_default=False),
    seed: int = typer.Option(None, "--seed", show_default=False),
    synthetic_fraction: float = typer.Option(None, "--synthetic-fraction", min=0.0, max=1.0, help="share of every batch made on the fly "
                                             "from the reference (train.synthetic_fraction)", show_default=False),
    reference: Path = typer.Option(None, "--reference", "-r", help="map for the synthetic examples (default: align's reference)",
                                   show_default=False),
    resume: bool = typer.Option(False, "--resume", help="continue from the last finished epoch of each region"),
    merge: bool = typer.Option(False, "--merge", help="after SLURM shards: check every region is trained, write metrics, finish the stage"),
    config: Path = CONFIG_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Train one CNN per region on the labelled subset."""
    with exit_on_interrupt():
        _train(project, regions, epochs, images_per_region, model, seed, synthetic_fraction, reference, resume, merge, config, force)


def _train(project, regions, epochs, images_per_region, model, seed, synthetic_fraction, reference, resume, merge, config, force) -> None:
    from ..core import models, training

    cfg, tc = stage_config(config, "train", epochs=epochs, images_per_region=images_per_region, model=model, seed=seed,
                           synthetic_fraction=synthetic_fraction)
    proj = Project.open(project)
    proj.require_done("label")
    n_regions = proj.n_regions()
    train_dir = proj.root / "train"
    if merge:
        return merge_shards(proj, train_dir, n_regions, tc)
    check_can_run(proj, "train", force or resume or regions is not None)
    requested = todo = parse_regions(regions, n_regions)
    one_net = models.get(tc.model).one_net
    if one_net and regions is not None:
        raise DeepAlignError(f"--regions: the {tc.model} model trains all regions at once; use model: per_region to shard")

    labels_path, src, y = load_labels(proj, cfg, n_regions)
    with Timer() as t_load:
        images = src.read(np.arange(len(src)))
        generator, syn_info = None, None
        if models.synthetic_fraction(tc):
            generator, syn_info = synthetic_generator(proj, cfg, tc, src, images, n_regions, reference, config)
    digest = settings_digest(tc, cfg.preprocess, hashlib.sha256(labels_path.read_bytes()).digest(),
                             None if syn_info is None else syn_info["digest"])
    resume_state = {}
    if resume:
        todo, resume_state = resume_plan(train_dir, requested, training.TRUNK if one_net else None, digest)

    def save_resume(unit, epoch, state):
        ckpt.write_entry(ckpt.resume_file(train_dir, unit), {**state, SETTINGS_KEY: digest})

    with Timer() as t:
        results = train_with_progress(images, y, todo, tc, src.box, resume_state, save_resume, generator)
    for r, entry in results.items():
        ckpt.write_entry(ckpt.region_file(train_dir, r), {**entry, "region": int(r), "box": src.box, "pixel_ang": src.pixel_ang, SETTINGS_KEY: digest})
    shards = record_shard(proj, format_regions(requested))
    missing = sorted(set(range(n_regions)) - set(ckpt.existing_regions(train_dir)))
    console.print(f"[green]trained[/green] regions {format_regions(todo) or 'none (all finished before)'} in {t.seconds:.1f} s "
                  f"(+{t_load.seconds:.1f} s loading {len(images)} images at {src.box} px)")
    if missing:
        console.print(f"train: {len(missing)} region(s) still to train ({format_regions(missing)}); the stage is done when all are")
        return
    write_metrics(train_dir, n_regions)
    proj.mark_done("train", outputs=[train_dir / "metrics.json", train_dir / "metrics.csv", train_dir / "curves.png"],
                   seconds=t.seconds + t_load.seconds, config=tc, box=src.box, pixel_ang=src.pixel_ang, shards_done=shards,
                   synthetic=None if syn_info is None else {k: v for k, v in syn_info.items() if k != "digest"},
                   **validation_record(y, tc))


def load_labels(proj: Project, cfg, n_regions: int) -> tuple[Path, ParticleSource, np.ndarray]:
    """labels.star, its images as every stage prepares them, and each particle's region."""
    labels_path = proj.root / "label" / "labels.star"
    table = star.read_particles(labels_path)
    src = ParticleSource(table, cfg.preprocess)
    host_malloc.share_one_arena(src.box)  # before JAX starts its threads (see host_malloc)
    check_against_project(src, proj, labels_path)
    y = table.particles["rlnDeepAlignRegion"].to_numpy(int)
    if y.max(initial=-1) >= n_regions:
        raise DeepAlignError(f"{labels_path}: region {y.max()} but the project has {n_regions} regions; rerun deepalign label --force")
    return labels_path, src, y


def train_with_progress(images: np.ndarray, y: np.ndarray, todo: list[int], tc, box: int, resume_state: dict, save_resume,
                        generator=None) -> dict:
    """`core.training.train_regions` with a progress bar over region-epochs (augmented images
    per second and the latest validation accuracy)."""
    import jax

    from ..core import training

    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"train {len(todo)} regions @ {box} px", total=len(todo) * tc.epochs, rate="")
        images_seen = [0]

        def on_event(ev):
            if ev["event"] == "skipped":
                bar.console.print(f"[yellow]warning:[/yellow] {ev['warning']}")
                bar.advance(task, tc.epochs)
                return
            images_seen[0] += ev["images"]
            rate = images_seen[0] / max(time.perf_counter() - t0, 1e-9)
            width = len(ev["regions"])  # one region's net, or every region of a one-net model
            bar.update(task, advance=width, rate=f"{rate:,.0f} img-steps/s  val_acc {ev.get('val_acc') or float('nan'):.3f}")
            if ev.get("stopped"):
                bar.advance(task, width * (tc.epochs - 1 - ev["epoch"]))

        return training.train_regions(images, y, todo, tc, jax.random.key(tc.seed), progress=on_event,
                                      resume_state=resume_state or None, checkpoint_cb=save_resume, generator=generator)


NOISE_SAMPLE = 1000  # project particles whose mean radial power spectrum is the synthetic noise's


def synthetic_generator(proj: Project, cfg, tc, src: ParticleSource, images: np.ndarray, n_regions: int, reference: Path | None,
                        config_path: Path | None):
    """The `core.synthetic.Generator` of train.synthetic_fraction at the labelled particles' working
    box: the reference align would use, the project's particles' CTFs and radial power spectrum,
    the labelled particles' shift range and SNR (measured, or train.synthetic_snr).
    Returns (generator, info for project.yaml and the resume digest)."""
    from ..core import projector, synthetic
    from ..core.score import particle_ctfs
    from ._reconstruction import load_reference, project_regions

    table = src.table
    eulers, origins = star.get_poses(table, hint="synthetic examples need the labelled particles' poses")
    ref = load_reference(proj, reference, src, cfg.preprocess, config_path)
    vol, ref_desc = ref.map, ref.description
    vol_ft = projector.prepare_volume(vol)
    centres, ops = project_regions(proj, cfg)
    if len(centres) != n_regions:
        raise DeepAlignError(f"{proj.yaml_path}: {len(centres)} regions in the recorded region settings but {n_regions} labelled")
    project_src = ParticleSource(star.read_particles(proj.particles_star), cfg.preprocess) if proj.particles_star else src
    rows = np.unique(np.linspace(0, len(project_src) - 1, min(len(project_src), NOISE_SAMPLE)).astype(int))
    power = synthetic.radial_power(project_src.read(rows))
    ctf_all = project_src.ctf_params()
    origins_px = origins / src.pixel_ang
    if tc.synthetic_snr is not None:
        snr, how = float(tc.synthetic_snr), "train.synthetic_snr"
    else:
        lab_ctf = src.ctf_params()
        ctfs = None if lab_ctf is None else np.asarray(particle_ctfs(lab_ctf, np.arange(len(src)), src.box, src.pixel_ang))
        snr, how = synthetic.estimate_snr(images, vol_ft, eulers, origins_px, ctfs), "measured on the labelled particles"
    max_shift = float(np.percentile(np.abs(origins_px), 95)) if len(origins_px) else 0.0
    gen = synthetic.generator(vol_ft, centres, ops, pixel_ang=src.pixel_ang, ctf_rows=synthetic.ctf_table(ctf_all, len(project_src)),
                              noise_power=power, snr=snr, max_shift_px=max_shift, bg_radius_frac=cfg.preprocess.bg_radius_frac)
    from ..core import models

    share = f"{models.synthetic_fraction(tc):.0%}"
    console.print(f"synthetic examples: {share} of every batch, made on the fly from {ref_desc}, SNR {snr:.3g} ({how}), "
                  f"shifts ≤ {max_shift:.1f} px, noise spectrum of {len(rows)} particles")
    info = {"fraction": models.synthetic_fraction(tc), "reference": ref_desc, "snr": round(snr, 5), "snr_from": how,
            "max_shift_px": round(max_shift, 3), "noise_particles": int(len(rows)),
            "digest": settings_digest(round(snr, 6), round(max_shift, 6), [round(float(v), 6) for v in power], ref_desc,
                                      float(np.asarray(vol, float).sum()))}
    return gen, info


def record_shard(proj: Project, spec: str) -> list[str]:
    """Add `spec` to the train stage's shards_done under the project lock (concurrent shards keep
    each other's entries); returns the list."""
    def change(state: dict) -> None:
        entry = state["stages"].setdefault("train", {"done": False})
        entry["shards_done"] = sorted(set(entry.get("shards_done") or []) | {spec})

    return proj.update(change)["stages"]["train"]["shards_done"]


def resume_plan(train_dir: Path, todo: list[int], trunk_unit: str | None, digest: str) -> tuple[list[int], dict]:
    """(regions still to train, the saved states of their training units) for --resume.

    A region whose final checkpoint carries `digest` is finished; with a one-net model
    (trunk_unit = its training unit) only all regions together are. A saved state with another
    digest is an error: it belongs to other settings."""
    finished = [r for r in todo if _entry_digest(ckpt.region_file(train_dir, r)) == digest]
    if trunk_unit is None:
        todo = [r for r in todo if r not in finished]
    elif len(finished) == len(todo):
        todo = []
    states = {}
    for r in ([trunk_unit] if trunk_unit is not None and todo else todo):
        path = ckpt.resume_file(train_dir, r)
        if not path.exists():
            continue
        entry = ckpt.read_entry(path)
        if entry.get(SETTINGS_KEY) != digest:
            raise DeepAlignError(f"{path}: saved with other train/preprocess settings or labels; rerun with the same --config, "
                                 f"or without --resume to start over")
        states[r] = entry
    if finished:
        console.print(f"resume: region(s) {format_regions(finished)} already trained; "
                      f"{len(states)} region state(s) continue from their last saved epoch")
    return todo, states


def _entry_digest(path: Path) -> str | None:
    return ckpt.read_entry(path).get(SETTINGS_KEY) if path.is_file() else None


def validation_record(labels: np.ndarray, tc) -> dict:
    """What the train stage records of its validation split, for `predict --coverage` to check
    that it calibrates on exactly those particles."""
    val = validation_split(labels, tc.seed, tc.validation_fraction).val
    return {"validation_particles": int(val.size), "validation_sha256": validation_digest(val)}


def merge_shards(proj: Project, train_dir: Path, n_regions: int, tc) -> None:
    missing = sorted(set(range(n_regions)) - set(ckpt.existing_regions(train_dir)))
    if missing:
        raise DeepAlignError(f"{train_dir}: region(s) {format_regions(missing)} not trained yet; run deepalign train --regions {format_regions(missing)}")
    write_metrics(train_dir, n_regions)
    record = proj.stage("train")
    first = ckpt.read_entry(ckpt.region_file(train_dir, 0))
    proj.mark_done("train", outputs=[train_dir / "metrics.json", train_dir / "metrics.csv", train_dir / "curves.png"], seconds=record.get("seconds"),
                   config=tc, box=first.get("box"), pixel_ang=first.get("pixel_ang"), shards_done=record.get("shards_done", []),
                   **validation_record(star.read_particles(proj.root / "label" / "labels.star").particles["rlnDeepAlignRegion"].to_numpy(int), tc))
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
