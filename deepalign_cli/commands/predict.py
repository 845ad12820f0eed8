"""Probability of every particle for every region; keep each particle's best regions.

Examples:

    deepalign predict demo                       # top-2 regions (the paper's choice)
    deepalign predict ribo --top-k 3
    deepalign predict ribo --cumulative-p 0.9    # keep regions until 90 % of the probability mass

    deepalign predict ribo --coverage 0.95       # keep the true region for 95 % of particles (calibrated)

The rule is one of: a fixed number (--top-k, default 2); a cumulative probability mass
(--cumulative-p p: regions in descending probability until their share of the particle's total
reaches p; at least one); or a coverage (--coverage c: the cumulative rule with the p for which
the true region is kept for a share c of the labelled particles that training held out for
validation — split conformal calibration, `core/coverage.py`; nets that are unsure or
confidently wrong then keep more regions instead of dropping the true one). A rule given on the
command line replaces the config's. Streams the project's particles (memory-mapped, chunked to
--memory-budget-gb) through every region net. Writes PROJECT/predict/probabilities.npy
(particles × regions, float32), predictions.star (the particles with rlnDeepAlignRegions = "3,17",
rlnDeepAlignRegion1 and rlnDeepAlignProb1) and top1_prob.png; with --coverage also
calibration.json (the chosen p, the held-out particles' scores) and coverage.png.
"""

from __future__ import annotations

import io as _io
import json
import time
from pathlib import Path

import numpy as np
import typer

from .. import host_malloc, plots
from ..config import override
from ..core.split import validation_digest, validation_split
from ..errors import DeepAlignError
from ..io import checkpoints as ckpt
from ..io import star
from ..io.atomic import staged_dir
from ..io.project import Project
from ..particles import ParticleSource, check_against_project
from ..regionspec import format_regions
from ._common import CONFIG_OPT, FORCE_OPT, PROJECT_ARG, Timer, check_can_run, console, progress, stage_config

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
    coverage: float = typer.Option(None, "--coverage", help="instead of --top-k: keep enough regions for the true one to be kept for this "
                                   "share of the labelled particles held out of training (e.g. 0.95)", show_default=False),
    memory_budget_gb: float = typer.Option(None, "--memory-budget-gb", show_default=False),
    config: Path = CONFIG_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Probabilities of every particle for every region; keep its best regions (top-k, cumulative p or calibrated coverage)."""
    from ..core import inference

    cfg, pc = stage_config(config, "predict", memory_budget_gb=memory_budget_gb)
    pc = rule_from_flags(pc, top_k=top_k, cumulative_p=cumulative_p, coverage=coverage)
    cfg = cfg.model_copy(update={"predict": pc})
    proj = Project.open(project)
    proj.require_done("train")
    check_can_run(proj, "predict", force)
    host_malloc.share_one_arena(proj.stage("train").get("box") or 0)  # before JAX starts its threads (loading the nets starts them)
    n_regions = proj.n_regions()
    models = load_models(proj.root / "train", n_regions)
    trained = [r for r in range(n_regions) if models[r].get("params") is not None]
    if not trained:
        raise DeepAlignError(f"{proj.root / 'train'}: every region was skipped in training; nothing to predict with")
    skipped = sorted(set(range(n_regions)) - set(trained))
    if skipped:
        console.print(f"[yellow]warning:[/yellow] region(s) {format_regions(skipped)} were skipped in training: probability 0")
    table, src = load_particles(proj, cfg)

    predictor = inference.prepare({r: models[r] for r in trained}, pc.batch_size, memory_budget_gb=pc.memory_budget_gb)
    calibration = calibrate(proj, cfg, predictor, pc) if pc.coverage is not None else None
    with Timer() as t:
        probs = predict_all(src, predictor, n_regions, min(src.chunk_size(pc.memory_budget_gb), 8192))
    keep = kept_regions(probs, pc, calibration, trained, skipped)
    mean_k = write_stage(proj, table, probs, keep, calibration, pc, t.seconds, len(trained))
    rate = len(src) * len(trained) / max(t.seconds, 1e-9)
    console.print(f"[green]predicted[/green] {len(src)} particles × {len(trained)} regions in {t.seconds:.1f} s ({rate:,.0f} particle·region/s); "
                  f"{mean_k:.2f} regions kept per particle → {proj.root / 'predict'}/predictions.star")
    say_how_narrow(pc, calibration, mean_k, n_regions, skipped)


def load_particles(proj: Project, cfg):
    """The project's particle table and its images prepared as for training (same box)."""
    particles_star = proj.particles_star
    table = star.read_particles(particles_star)
    src = ParticleSource(table, cfg.preprocess)
    check_against_project(src, proj, particles_star)
    train_box = proj.stage("train").get("box")
    if train_box is not None and train_box != src.box:
        raise DeepAlignError(f"{particles_star}: prepared images are {src.box} px but the nets were trained at {train_box} px; use the same preprocess config")
    return table, src


def predict_all(src: ParticleSource, predictor, n_regions: int, chunk: int) -> np.ndarray:
    """(n, n_regions) probabilities of every particle, streamed in chunks; untrained columns 0."""
    from ..core import inference

    probs = np.zeros((len(src), n_regions), np.float32)
    columns = np.asarray(predictor.regions)[None, :]
    with progress() as bar:
        task = bar.add_task(f"predict {len(predictor.regions)} regions", total=len(src), rate="")
        t0 = time.perf_counter()
        for idx, images in src.iter_chunks(chunk):
            probs[idx[:, None], columns] = inference.predict(predictor, images)
            done = idx[-1] + 1
            bar.update(task, completed=done, rate=f"{done * columns.size / max(time.perf_counter() - t0, 1e-9):,.0f} particle·region/s")
    return probs


def kept_regions(probs: np.ndarray, pc, calibration: dict | None, trained: list[int], skipped: list[int]) -> list[np.ndarray]:
    """Each particle's kept regions, most probable first, by the predict config's rule. Under
    --coverage, regions skipped in training (probability 0) are always kept: the nets cannot rule
    them out, and the calibration covers only the trained ones."""
    from ..core import coverage

    if calibration is not None:
        kept = coverage.top_k_regions(probs[:, trained], cumulative_p=calibration["p"])
        return [np.concatenate([np.asarray(trained)[k], skipped]).astype(int) for k in kept]
    if pc.cumulative_p is not None:
        return coverage.top_k_regions(probs, cumulative_p=pc.cumulative_p)
    return coverage.top_k_regions(probs, k=pc.top_k)


def write_stage(proj: Project, table, probs: np.ndarray, keep: list, calibration: dict | None, pc, seconds: float, n_trained: int) -> float:
    """predict/: probabilities.npy, predictions.star, top1_prob.png (+ calibration.json and
    coverage.png), written together; marks the stage done. Returns the mean kept regions."""
    n, n_regions = probs.shape
    out = table.copy()
    out.particles["rlnDeepAlignRegions"] = [",".join(str(int(r)) for r in k) for k in keep]
    out.particles["rlnDeepAlignRegion1"] = [int(k[0]) for k in keep]
    out.particles["rlnDeepAlignProb1"] = np.round(probs[np.arange(n), [int(k[0]) for k in keep]], 5)
    mean_k = float(np.mean([len(k) for k in keep]))
    with staged_dir(proj.root / "predict") as tmp:
        buf = _io.BytesIO()
        np.save(buf, probs)
        (tmp / "probabilities.npy").write_bytes(buf.getvalue())
        star.write_particles(tmp / "predictions.star", out)
        plots.histogram(tmp / "top1_prob.png", probs.max(axis=1), "probability of the top region", f"{n} particles, {n_trained} region nets")
        if calibration is not None:
            calibration["mean_regions_kept"] = round(mean_k, 3)
            write_calibration(tmp, calibration, n_regions)
    pdir = proj.root / "predict"
    extra_out = [pdir / "calibration.json", pdir / "coverage.png"] if calibration is not None else []
    proj.mark_done("predict", outputs=[pdir / "probabilities.npy", pdir / "predictions.star", pdir / "top1_prob.png", *extra_out],
                   seconds=seconds, config=pc, particle_regions_per_s=round(n * n_trained / max(seconds, 1e-9), 1),
                   **({"calibrated_cumulative_p": calibration["cumulative_p"]} if calibration is not None else {}))
    return mean_k


def say_how_narrow(pc, calibration: dict | None, mean_k: float, n_regions: int, skipped: list[int]) -> None:
    """The calibration's outcome, and a warning where the rule barely narrows align's search."""
    always = f" (the {len(skipped)} regions skipped in training are always kept)" if skipped and calibration is not None else ""
    if calibration is not None:
        c = calibration
        p_txt = "every region" if c["cumulative_p"] is None else f"cumulative p {c['cumulative_p']:.4f}"
        console.print(f"coverage {pc.coverage:g}: calibrated on {c['n_held_out']} held-out labelled particles → {p_txt}", highlight=False)
        if c["cumulative_p"] is None:
            console.print(f"[yellow]warning:[/yellow] {c['n_held_out']} held-out labelled particles cannot certify coverage {pc.coverage:g} "
                          f"(it needs ≥ {c['min_held_out']}): every region is kept, so align searches the whole asymmetric unit. "
                          "More labelled particles, a larger validation_fraction or a lower --coverage narrow it.", highlight=False)
        elif mean_k > FLAT_FRACTION * n_regions:
            console.print(f"[yellow]note:[/yellow] --coverage {pc.coverage:g} keeps {mean_k:.1f} of {n_regions} regions per particle{always}: "
                          "the nets are not sure enough to narrow the search much (particles whose regions cost as much as the "
                          "asymmetric unit are searched over all of it).", highlight=False)
    if pc.cumulative_p is not None and mean_k > FLAT_FRACTION * n_regions:
        console.print(f"[yellow]warning:[/yellow] flat probabilities: --cumulative-p {pc.cumulative_p} keeps {mean_k:.1f} of "
                      f"{n_regions} regions per particle, so align's search is barely narrowed (particles whose regions "
                      "cost as much as the asymmetric unit are searched over all of it). More labelled particles or "
                      "training sharpen the nets; `align --exhaustive` skips them.", highlight=False)


def rule_from_flags(pc, top_k: int | None, cumulative_p: float | None, coverage: float | None):
    """The predict config with the command line's rule (at most one flag) replacing the config's."""
    given = {k: v for k, v in {"top_k": top_k, "cumulative_p": cumulative_p, "coverage": coverage}.items() if v is not None}
    if len(given) > 1:
        raise DeepAlignError("command-line options: give one of --top-k, --cumulative-p and --coverage")
    if not given:
        return pc
    return override(pc.model_copy(update={"cumulative_p": None, "coverage": None}), **given)


def calibrate(proj: Project, cfg, predictor, pc) -> dict:
    """Cumulative p for `pc.coverage` from the labelled particles the training run held out for
    validation (the same split: training's seed, validation fraction and labels)."""
    from ..core import coverage, inference

    labels_path = proj.root / "label" / "labels.star"
    tc = (proj.state.get("config") or {}).get("train") or {}
    fraction, seed = tc.get("validation_fraction"), tc.get("seed")
    if fraction is None or seed is None:
        raise DeepAlignError(f"{proj.root}: the train stage recorded no validation split; rerun deepalign train --force")
    if fraction <= 0:
        raise DeepAlignError(f"--coverage: {labels_path}: training held out no labelled particles (validation_fraction 0); "
                             "use --top-k or --cumulative-p, or train with a validation split")
    table = star.read_particles(labels_path)
    y = table.particles["rlnDeepAlignRegion"].to_numpy(int)
    val_idx = validation_split(y, seed, fraction).val
    recorded = proj.stage("train").get("validation_sha256")
    if recorded is not None and recorded != validation_digest(val_idx):
        raise DeepAlignError(f"--coverage: {labels_path}: the labelled particles held out of training are not those the train stage "
                             "recorded (labels changed since training?); rerun deepalign train --force")
    src = ParticleSource(table, cfg.preprocess)
    # held-out particles of regions skipped in training are covered anyway (those regions are
    # always kept); the trained regions' nets are calibrated on the others
    val_idx = val_idx[np.isin(y[val_idx], predictor.regions)]
    probs = np.zeros((len(val_idx), len(predictor.regions)), np.float32)
    if len(val_idx):
        probs[:] = inference.predict(predictor, src.read(val_idx))
    columns = np.searchsorted(predictor.regions, y[val_idx])
    return coverage.calibrate(probs, columns, pc.coverage)


def write_calibration(folder: Path, c: dict, n_regions: int) -> None:
    plain = {k: v for k, v in c.items() if k not in ("p", "scores", "curve")}
    plain["held_out_scores"] = [round(float(v), 6) for v in c["scores"]]
    plain["curve"] = {k: np.asarray(v).tolist() for k, v in c["curve"].items()}
    (folder / "calibration.json").write_text(json.dumps(plain, indent=1))
    chosen = None
    if c["n_held_out"]:
        chosen = (c["held_out_mean_regions_at_p"], c["held_out_kept_at_p"])
    plots.coverage_curve(folder / "coverage.png", c["curve"]["mean_regions"], c["curve"]["kept"], c["coverage"],
                         chosen, n_regions, f"predict --coverage {c['coverage']:g}: {c['n_held_out']} held-out labelled particles")
