"""Accuracy and timing report of a project, optionally against the true poses.

Examples:

    deepalign report demo                                  # uses demo/simulated/truth.star when present
    deepalign report ribo --truth relion_refine/run_data.star

Reports: region hit rate of predict (top-1/2/3 against the truth's regions, held-out particles
i.e. not in the labelled subset), angular error of every aligned set (align/, align_exhaustive/,
consensus/, and refine/ once refine finished) against the truth (median, 90th percentile, % within 5°
and 10°, symmetry-aware full rotation), shift error, FSC resolution of each reconstruction, the
refined set (particles, input → refined gold-standard resolution at FSC 0.143 and 0.5, iterations,
seconds; from refine/summary.json) when the refine stage finished, and wall time per stage. Writes
PROJECT/report/report.json, report.md and errors.png (cumulative angular error).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from .. import plots
from ..core import evaluation
from ..core.consensus import match_by_name
from ..errors import DeepAlignError
from ..io import star
from ..io.atomic import write_text_atomic
from ..io.project import Project
from ..regionspec import region_lists
from ._common import PROJECT_ARG, console
from .symmetry_arg import operators_for

ALIGNED_SETS = {"align": "align/aligned.star", "align --exhaustive": "align_exhaustive/aligned.star", "consensus": "consensus/consensus.star"}
REFINE_STAGE = "refine"
REFINED_SET = {"refine": "refine/refined.star"}  # an aligned set too, once the refine stage finished
REFINE_KEYS = ("from", "n_particles", "half_sizes", "input_resolution_ang", "resolution_ang", "resolution_fsc05_ang", "iterations",
               "written_iteration", "converged", "final_box_px", "final_pixel_ang", "nyquist_ang", "seconds")  # what the report keeps of refine/summary.json


def _matched(est_table, truth_table):
    common, (i_est, i_true), _ = match_by_name([star.image_names(est_table), star.image_names(truth_table)])
    if len(common) == 0:
        raise DeepAlignError(f"{est_table.source}: no particle in common with {truth_table.source}")
    return i_est, i_true


def _truth_path(root: Path, truth: Path | None) -> Path | None:
    """--truth, else PROJECT/simulated/truth.star when it exists, else None."""
    return truth or (root / "simulated" / "truth.star" if (root / "simulated" / "truth.star").exists() else None)


def _region_geometry(proj: Project):
    """The project's symmetry operators, canonical symmetry name and region centres (defaults: 30°, C1)."""
    from ..core import regions as regions_core

    reg = proj.stage_config("regions") or {"spacing_deg": 30.0, "symmetry": "C1"}
    ops, sym = operators_for(reg["symmetry"])
    centres = regions_core.region_centres(reg["spacing_deg"], ops)
    return ops, sym, centres


def _held_out(root: Path, pred, i_pred) -> np.ndarray:
    """Mask of the matched predicted particles that are not in the labelled subset."""
    held = np.ones(len(i_pred), bool)
    labels = root / "label" / "labels.star"
    if labels.exists():
        lab_names = star.image_names(star.read_particles(labels))
        _, (i_lab_pred, _), _ = match_by_name([np.asarray(star.image_names(pred))[i_pred], lab_names])
        held[i_lab_pred] = False
    return held


def _predict_section(root: Path, truth_table, e_true, centres, ops) -> dict | None:
    """Region hit rate of predict on held-out particles (+ that of the regions it kept); None without predict."""
    probs_path = root / "predict" / "probabilities.npy"
    if not probs_path.exists():
        return None
    pred = star.read_particles(root / "predict" / "predictions.star")
    i_pred, i_true = _matched(pred, truth_table)
    probs = np.load(probs_path)[i_pred]
    true_reg = evaluation.true_regions(e_true[i_true], centres, ops)
    held = _held_out(root, pred, i_pred)
    section = {"held_out": int(held.sum()), "hit_rate": evaluation.region_hit_rates(probs[held], true_reg[held]),
               "chance_top1": 1.0 / len(centres)}
    if "rlnDeepAlignRegions" in pred.particles:  # the regions predict kept (its rule: top-k, cumulative p or coverage)
        kept = region_lists(pred.particles["rlnDeepAlignRegions"].iloc[i_pred])
        in_kept = np.array([t in k for t, k in zip(true_reg, kept)])
        section["kept_hit_rate"] = float(in_kept[held].mean()) if held.any() else None
        section["mean_regions_kept"] = float(np.mean([len(k) for k, h in zip(kept, held) if h])) if held.any() else None
    return section


def _align_section(root: Path, truth_table, e_true, o_true, ops, sets: dict = ALIGNED_SETS) -> tuple[dict, dict]:
    """Angular and shift error of every aligned set present ({label: path in PROJECT}), and each set's angular errors (for the plot)."""
    section, curves = {}, {}
    for label, rel in sets.items():
        path = root / rel
        if not path.exists():
            continue
        est = star.read_particles(path)
        i_est, i_true = _matched(est, truth_table)
        e_est, o_est = star.get_poses(est)
        s = evaluation.angular_error_summary(e_est[i_est], e_true[i_true], ops)
        pix = star.pixel_size(truth_table)
        sh = evaluation.shift_error_px(o_est[i_est], o_true[i_true], pix)
        curves[label] = s.pop("errors_deg")
        section[label] = {**s, "median_shift_error_px": float(np.median(sh))}
    return section, curves


def _reconstruct_section(root: Path) -> dict:
    """Each reconstruction's summary.json, by name."""
    summaries = sorted((root / "reconstruct").glob("*/summary.json")) if (root / "reconstruct").exists() else []
    return {summ.parent.name: json.loads(summ.read_text()) for summ in summaries}


def _refine_section(proj: Project) -> dict | None:
    """The refined set (REFINE_KEYS of refine/summary.json, else what project.yaml recorded); None unless refine finished."""
    if not proj.is_done(REFINE_STAGE):
        return None
    record = proj.stage(REFINE_STAGE)
    path = proj.root / "refine" / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    section = {k: summary[k] for k in REFINE_KEYS if k in summary}
    for k in ("n_particles", "resolution_ang", "iterations", "seconds"):
        if section.get(k) is None and record.get(k) is not None:
            section[k] = record[k]
    first = (summary.get("history") or [{}])[0]
    if section.get("input_resolution_ang") is not None and first.get("pixel_ang"):
        # iteration 0 reconstructs at the project's working box: an FSC reaching its Nyquist only bounds the input's resolution
        section["input_resolution_at_nyquist"] = bool(section["input_resolution_ang"] <= 2 * first["pixel_ang"] * 1.001)
        section["input_box_px"] = first.get("box_px")
    return section


def _write_report(out: Path, rep: dict, curves: dict, sym: str) -> None:
    """Write report.json, report.md and (with aligned sets) errors.png into `out`."""
    out.mkdir(exist_ok=True)
    md = _markdown(rep)
    if curves:
        plots.cumulative_errors(out / "errors.png", curves, f"angular error vs truth ({sym})")
    write_text_atomic(out / "report.json", json.dumps(rep, indent=1, default=float))
    write_text_atomic(out / "report.md", md)


def command(
    project: Path = PROJECT_ARG,
    truth: Path = typer.Option(None, "--truth", help="STAR with the true poses (default: PROJECT/simulated/truth.star)", show_default=False),
) -> None:
    """Accuracy and timing report of a project (optionally against the truth)."""
    proj = Project.open(project)
    root = proj.root
    truth = _truth_path(root, truth)
    ops, sym, centres = _region_geometry(proj)
    rep: dict = {"project": str(root), "truth": str(truth) if truth else None, "symmetry": sym, "n_regions": int(len(centres))}

    curves = {}
    refine = _refine_section(proj)
    if truth:
        truth_table = star.read_particles(truth)
        e_true, o_true = star.get_poses(truth_table, hint="--truth needs poses")
        predict = _predict_section(root, truth_table, e_true, centres, ops)
        if predict is not None:
            rep["predict"] = predict
        sets = {**ALIGNED_SETS, **REFINED_SET} if refine is not None else ALIGNED_SETS
        align, curves = _align_section(root, truth_table, e_true, o_true, ops, sets)
        if align:
            rep["align"] = align
        if refine is not None and "refine" in align:  # refined poses are meant to be finer than 5°: their share within 2° too
            refine["vs_truth"] = {**align["refine"], "within_2_pct": float(100 * np.mean(curves["refine"] <= 2))}
    reconstruct = _reconstruct_section(root)
    if reconstruct:
        rep["reconstruct"] = reconstruct
    if refine is not None:
        rep["refine"] = refine
    rep["stages"] = {k: {"seconds": v.get("seconds"), "done": v.get("done")} for k, v in proj.state.get("stages", {}).items()}
    rep["total_seconds"] = float(sum(v["seconds"] or 0 for v in rep["stages"].values()))

    out = root / "report"
    _write_report(out, rep, curves, sym)
    _print(rep)
    console.print(f"report → {out}/report.md" + (", errors.png" if curves else ""))


def _markdown(rep: dict) -> str:
    lines = [f"# deepalign report: {rep['project']}", "", f"symmetry {rep['symmetry']}, {rep['n_regions']} regions; truth: {rep['truth']}", ""]
    if "predict" in rep:
        p = rep["predict"]
        lines += ["## predict (held-out particles)", "", "| top-k | hit rate |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in p["hit_rate"].items()]
        if p.get("kept_hit_rate") is not None:
            lines.append(f"| regions kept by predict ({p['mean_regions_kept']:.2f} per particle) | {p['kept_hit_rate']:.3f} |")
        lines += ["", f"{p['held_out']} held-out particles; chance top-1 = {p['chance_top1']:.3f}", ""]
    if "align" in rep:
        lines += ["## angular error vs truth", "", "| set | n | median (°) | 90th pct (°) | ≤ 5° | ≤ 10° | median shift error (px) |", "|---|---|---|---|---|---|---|"]
        for k, s in rep["align"].items():
            lines.append(f"| {k} | {s['n']} | {s['median_deg']:.2f} | {s['p90_deg']:.2f} | {s['within_5_pct']:.1f} % | {s['within_10_pct']:.1f} % | {s['median_shift_error_px']:.2f} |")
        lines.append("")
    if "reconstruct" in rep:
        lines += ["## reconstructions", "", "| map | particles | FSC 0.143 resolution (Å) |", "|---|---|---|"]
        for k, s in rep["reconstruct"].items():
            lines.append(f"| {k} | {s.get('n_particles', '?')} | {s.get('resolution_ang', float('nan')):.1f} |")
        lines.append("")
    if "refine" in rep:
        lines += ["## refine (gold-standard local refinement)", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _refine_rows(rep["refine"])]
        lines.append("")
    lines += ["## time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v['seconds'] if v['seconds'] is not None else '—'} |" for k, v in rep["stages"].items()]
    lines += [f"| **total** | {rep['total_seconds']:.1f} |", ""]
    return "\n".join(lines)


def _fmt(value, spec: str, unit: str = "") -> str:
    return "?" if value is None else f"{value:{spec}}{unit}"


def _refine_rows(r: dict) -> list[tuple[str, str]]:
    """(label, value) lines of the refined set, for report.md and the terminal."""
    halves = f" (halves {r['half_sizes'][0]} / {r['half_sizes'][1]})" if r.get("half_sizes") else ""
    rows = [("particles", f"{_fmt(r.get('n_particles'), 'd')}{halves}"),
            ("resolution, FSC 0.143: input poses → refined", f"{_fmt(r.get('input_resolution_ang'), '.2f', ' Å')}"
             + (f" (Nyquist of the {r.get('input_box_px', '?')} px working box: the input may be better)" if r.get("input_resolution_at_nyquist") else "")
             + f" → {_fmt(r.get('resolution_ang'), '.2f', ' Å')}"),
            ("resolution, FSC 0.5", _fmt(r.get("resolution_fsc05_ang"), ".2f", " Å"))]
    if r.get("final_box_px") is not None:
        rows.append(("final working box", f"{r['final_box_px']} px at {_fmt(r.get('final_pixel_ang'), '.3f', ' Å')} (Nyquist of the particles "
                                          f"{_fmt(r.get('nyquist_ang'), '.2f', ' Å')})"))
    converged = {True: " (converged)", False: " (stopped at the iteration limit)"}.get(r.get("converged"), "")
    written = r.get("written_iteration")
    if written is not None and written != r.get("iterations"):  # refine.finest_state kept the iteration before a global pass
        converged += f"; iteration {written} written (finer than the last, after a global pass)"
    rows += [("iterations", f"{_fmt(r.get('iterations'), 'd')}{converged}"), ("seconds", _fmt(r.get("seconds"), ".1f"))]
    if "vs_truth" in r:
        s = r["vs_truth"]
        rows.append(("angular error vs truth", f"median {s['median_deg']:.2f}°, 90th pct {s['p90_deg']:.2f}°, ≤ 2° {s['within_2_pct']:.1f} %, ≤ 5° {s['within_5_pct']:.1f} %, "
                                               f"≤ 10° {s['within_10_pct']:.1f} %, median shift error {s['median_shift_error_px']:.2f} px"))
    if r.get("from"):
        rows.append(("input", str(r["from"])))
    return rows


def _print(rep: dict) -> None:
    if "predict" in rep:
        t = Table(title="predict: true region among the top-k (held-out)")
        t.add_column("top-k"); t.add_column("hit rate", justify="right")
        for k, v in rep["predict"]["hit_rate"].items():
            t.add_row(str(k), f"{v:.3f}")
        if rep["predict"].get("kept_hit_rate") is not None:
            t.add_row(f"kept ({rep['predict']['mean_regions_kept']:.2f})", f"{rep['predict']['kept_hit_rate']:.3f}")
        console.print(t)
    if "align" in rep:
        t = Table(title="angular error vs truth")
        for c in ("set", "n", "median °", "90th pct °", "≤5°", "≤10°", "shift err px"):
            t.add_column(c, justify="right")
        for k, s in rep["align"].items():
            t.add_row(k, str(s["n"]), f"{s['median_deg']:.2f}", f"{s['p90_deg']:.2f}", f"{s['within_5_pct']:.1f}%", f"{s['within_10_pct']:.1f}%", f"{s['median_shift_error_px']:.2f}")
        console.print(t)
    if "reconstruct" in rep:
        t = Table(title="reconstructions")
        t.add_column("map"); t.add_column("particles", justify="right"); t.add_column("resolution Å", justify="right")
        for k, s in rep["reconstruct"].items():
            t.add_row(k, str(s.get("n_particles", "?")), f"{s.get('resolution_ang', float('nan')):.1f}")
        console.print(t)
    if "refine" in rep:
        t = Table(title="refine (gold standard)", show_header=False)
        t.add_column("quantity"); t.add_column("value")
        for k, v in _refine_rows(rep["refine"]):
            t.add_row(k, v)
        console.print(t)
    t = Table(title="time per stage")
    t.add_column("stage"); t.add_column("seconds", justify="right")
    for k, v in rep["stages"].items():
        t.add_row(k, "—" if v["seconds"] is None else f"{v['seconds']:.1f}")
    t.add_row("total", f"{rep['total_seconds']:.1f}")
    console.print(t)
