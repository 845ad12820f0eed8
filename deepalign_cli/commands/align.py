"""Correlation search (rot, tilt, psi, shifts) of every particle inside its predicted regions.

Examples:

    deepalign align demo                                   # reference: demo/reconstruct/reference/map.mrc
    deepalign align demo --reference emd_1234.mrc --angular-step 3 --max-shift 8
    deepalign align demo --top-k 1                         # only the most probable region
    deepalign align demo --regions 0-9,17                  # one SLURM shard (top-1 region in the list)
    deepalign align demo --merge                           # shards → demo/align/aligned.star
    deepalign align demo --exhaustive                      # whole asymmetric unit → demo/align_exhaustive/
    deepalign align demo --reference emd_1234.mrc --mask mask.mrc   # your own mask instead of the solvent mask

Reference: --reference, else PROJECT/reconstruct/reference/map.mrc (`deepalign reconstruct PROJECT
--from PROJECT/label/labels.star --out reference`), else that same reconstruction built on the fly
from the labelled subset (the paper's workflow; a notice says so). A map whose voxel size differs
from the particles' working pixel is Fourier-cropped to it and centred/padded to the working box
(notice); a map coarser than the working pixel, or one that cannot be brought within 1 % of it, is
an error. A reference with half maps (a map.mrc beside half1.mrc and half2.mrc, as `reconstruct`
and `refine` write them, or the on-the-fly reconstruction) is weighted shell by shell by their FSC,
sqrt(2·FSC/(1+FSC)), and scored over the whole band it supports (up to the working box's Nyquist).
Any other map, or any map when align.lowpass_resolution_ang is set, is low-passed to
align.lowpass_resolution_ang, else preprocess.target_resolution_ang, else 3 × the working pixel
(the paper's pixel = resolution / 3), and the score uses the same band. The filtered map is then
masked: by --mask (any box and voxel size a reference may have, resampled the same way, values
clipped to [0, 1]), else by a solvent mask made from the filtered map itself (core.mask: smoothed to
30 Å, thresholded 3 SD above the solvent in the box's corners, extended 14 Å, 20 Å soft edge), so
the reference's solvent noise is not correlated with every image. summary.json records the filter
and the mask (reference_filter) and the band (lowpass_resolution_ang). Angular step default: Crowther, atan(resolution / box size in Å);
psi step default: the angular step. The gallery margin is at least 2 × 0.77 × step so that a pose
on a region border always has its nearest lattice direction in the gallery.

Candidate regions are the top-k of PROJECT/predict/predictions.star (`deepalign predict` first;
not needed with --exhaustive). Particles are streamed in chunks sized by align.memory_budget_gb.
Writes PROJECT/align/ (PROJECT/align_exhaustive/ with --exhaustive): aligned.star (the project's
particle table, every column kept, + rlnAngleRot/Tilt/Psi, rlnOriginXAngst/YAngst, rlnDeepAlignScore,
rlnDeepAlignRegion), scores.png, angles.png, summary.json. --regions writes only
shards/aligned_SPEC.star (+ .json); --merge joins the shards once every particle is covered.

Interruption: particles are aligned in fixed chunks (same boundaries for the same settings) and each
finished chunk is saved atomically to PROJECT/align/.partial/DIGEST/chunk_XXXXX.npz, DIGEST being a
hash of everything that shapes the result (particles, predictions, reference, steps, shifts, band,
regions, memory budget). Ctrl-C or SIGTERM stops with exit code 130 and "interrupted; rerun with
--resume"; `--resume` reuses the chunks saved under the same DIGEST (other settings start from the
first chunk) and writes the same aligned.star as an uninterrupted run. The partial folder goes
away when the stage (or shard) is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from .. import plots
from ..core import gallery, projector
from ..core.alignment import RESTRICTED_MIN_FRACTION, align_particles
from ..errors import DeepAlignError
from ..io import star
from ..io.atomic import staged_dir, write_text_atomic
from ..io.chunks import ChunkStore, array_digest
from ..io.project import Project
from ..particles import ParticleSource, check_against_project
from ..regionspec import region_lists
from ._common import (CONFIG_OPT, FORCE_OPT, PROJECT_ARG, Timer, check_can_run, console, exit_on_interrupt, progress, settings_digest,
                      stage_config)
from ._reconstruction import (align_geometry, load_reference, mask_at_working_geometry, project_preprocess, project_regions,
                              search_reference)

SHARDS = "shards"
RESULT_ARRAYS = ("eulers_deg", "origins_px", "score", "region", "whole_unit")  # one chunk's saved results
PREDICTIONS_COLUMN = "rlnDeepAlignRegions"
TOP1_COLUMN = "rlnDeepAlignRegion1"


# ----------------------------------------------------------------------------------- inputs
def parse_region_spec(spec: str) -> np.ndarray:
    """'0-9,17' → array([0, 1, …, 9, 17]); one-line error on anything else."""
    out = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise DeepAlignError(f"--regions {spec}: expected region indices and ranges such as 0-9,17")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return np.array(sorted(out), int)


def read_predictions(proj: Project, table: star.ParticleTable, n_regions: int, top_k: int | None, why: str = "") -> list[list[int]]:
    """Candidate regions per particle (best first) from PROJECT/predict/predictions.star."""
    path = proj.root / "predict" / "predictions.star"
    if not path.is_file():
        raise DeepAlignError(f"{path}: not found; run deepalign predict first{why or ' (or align --exhaustive)'}")
    pred = star.read_particles(path).particles
    if PREDICTIONS_COLUMN not in pred:
        raise DeepAlignError(f"{path}: no {PREDICTIONS_COLUMN} column; rerun deepalign predict")
    if len(pred) != len(table) or ("rlnImageName" in pred and list(pred["rlnImageName"].astype(str)) != star.image_names(table)):
        raise DeepAlignError(f"{path}: does not list the project's {len(table)} particles in order; rerun deepalign predict --force")
    try:
        cands = region_lists(pred[PREDICTIONS_COLUMN])
    except ValueError:
        raise DeepAlignError(f"{path}: {PREDICTIONS_COLUMN} must hold comma-separated region indices such as '3,17'")
    if top_k is not None:
        cands = [c[:top_k] for c in cands]
    bad = [r for c in cands for r in c if not 0 <= r < n_regions]
    if bad or any(len(c) == 0 for c in cands):
        what = f"region {bad[0]}" if bad else "a particle without regions"
        raise DeepAlignError(f"{path}: {what} but the project has {n_regions} regions (0–{n_regions - 1}); rerun deepalign predict")
    return cands


def candidate_matrix(cands: list[list[int]]) -> np.ndarray:
    """(n, k_max) int: rows of different length are padded with their first region (a set, so no change)."""
    k = max(len(c) for c in cands)
    return np.array([c + [c[0]] * (k - len(c)) for c in cands], int)


# ------------------------------------------------------------------------------------ output
def with_alignment(table: star.ParticleTable, rows: np.ndarray, eulers: np.ndarray, origins_ang: np.ndarray,
                   score: np.ndarray, region: np.ndarray) -> star.ParticleTable:
    """The rows of `table` with their poses, score and region (all input columns kept)."""
    sub = star.ParticleTable(table.particles.iloc[rows].reset_index(drop=True), table.optics, table.source)
    out = star.set_poses(sub, eulers, origins_ang)
    out.particles["rlnDeepAlignScore"] = np.round(np.asarray(score, float), 6)
    out.particles["rlnDeepAlignRegion"] = np.asarray(region, int)
    return out


def write_stage(out_dir: Path, aligned: star.ParticleTable, summary: dict) -> list[Path]:
    """aligned.star, scores.png, angles.png, summary.json into out_dir (whole or not at all; shards/ kept)."""
    names = ("aligned.star", "scores.png", "angles.png", "summary.json")
    df = aligned.particles
    mode = summary["mode"]
    with staged_dir(out_dir) as tmp:
        star.write_particles(tmp / "aligned.star", aligned)
        plots.histogram(tmp / "scores.png", df["rlnDeepAlignScore"].to_numpy(float), "normalised cross-correlation",
                        f"{len(df)} particles, {mode} search")
        plots.angular_distribution(tmp / "angles.png", df["rlnAngleRot"].to_numpy(float), df["rlnAngleTilt"].to_numpy(float),
                                   f"projection directions ({mode})")
        write_text_atomic(tmp / "summary.json", json.dumps(summary, indent=2) + "\n")
        if (out_dir / SHARDS).is_dir():
            (out_dir / SHARDS).replace(tmp / SHARDS)
    return [out_dir / f for f in names]


def merge_shards(proj: Project, table: star.ParticleTable, out_dir: Path) -> tuple[star.ParticleTable, dict]:
    """The project's table with the poses of every shard in out_dir/shards/; error naming what is missing."""
    files = sorted((out_dir / SHARDS).glob("aligned_*.star"))
    if not files:
        raise DeepAlignError(f"{out_dir / SHARDS}: no shard STAR files; run deepalign align {proj.root} --regions SPEC first")
    parts = [star.read_particles(f).particles for f in files]
    merged = pd.concat(parts, ignore_index=True).sort_values("rlnDeepAlignScore", ascending=False, kind="stable")
    merged = merged.drop_duplicates("rlnImageName").set_index("rlnImageName")
    names = pd.Index(star.image_names(table))
    missing = np.flatnonzero(~names.isin(merged.index))
    if len(missing):
        path = proj.root / "predict" / "predictions.star"
        hint = ""
        if path.is_file():
            top1 = [int(str(v).split(",")[0]) for v in star.read_particles(path).particles[PREDICTIONS_COLUMN].iloc[missing]]
            hint = f" (top-1 regions {','.join(map(str, sorted(set(top1))))}); run deepalign align {proj.root} --regions " + ",".join(map(str, sorted(set(top1))))
        raise DeepAlignError(f"{out_dir / SHARDS}: {len(missing)} of {len(table)} particles are in no shard, e.g. {names[missing[0]]}{hint}")
    got = merged.loc[names]
    cols = [*star.ANGLE_COLUMNS, *star.ORIGIN_ANG_COLUMNS]
    out = with_alignment(table, np.arange(len(table)), got[cols[:3]].to_numpy(float), got[cols[3:]].to_numpy(float),
                         got["rlnDeepAlignScore"].to_numpy(float), got["rlnDeepAlignRegion"].to_numpy(int))
    shard_info = [json.loads(f.with_suffix(".json").read_text()) for f in files if f.with_suffix(".json").is_file()]
    seconds = float(sum(s.get("seconds", 0.0) for s in shard_info))
    return out, {"shards": [f.name for f in files], "seconds": round(seconds, 3)}


# ----------------------------------------------------------------------------------- command
def command(
    project: Path = PROJECT_ARG,
    reference: Path = typer.Option(None, "--reference", "-r", help="reference map (MRC); default: PROJECT/reconstruct/reference/map.mrc", show_default=False),
    mask: Path = typer.Option(None, "--mask", help="reference mask (MRC; default: a solvent mask made from the reference)", show_default=False),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="search the whole asymmetric unit (baseline) → PROJECT/align_exhaustive/"),
    regions_spec: str = typer.Option(None, "--regions", help="shard: only particles whose top-1 region is in e.g. 0-9,17", show_default=False),
    merge: bool = typer.Option(False, "--merge", help="join the --regions shards into aligned.star"),
    angular_step: float = typer.Option(None, "--angular-step", help="gallery direction step (°)", show_default=False),
    psi_step: float = typer.Option(None, "--psi-step", help="in-plane step (°)", show_default=False),
    max_shift: float = typer.Option(None, "--max-shift", help="largest |origin| searched (working px)", show_default=False),
    top_k: int = typer.Option(None, "--top-k", min=1, help="use only the first k predicted regions of each particle", show_default=False),
    memory_budget_gb: float = typer.Option(None, "--memory-budget-gb", help="particles are read and aligned in chunks that fit this", show_default=False),
    resume: bool = typer.Option(False, "--resume", help="reuse the chunks an interrupted run with the same settings finished"),
    config: Path = CONFIG_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Correlation search inside each particle's top-k regions (or the whole asymmetric unit)."""
    with exit_on_interrupt():
        _align(project, reference, mask, exhaustive, regions_spec, merge, angular_step, psi_step, max_shift, top_k, memory_budget_gb,
               resume, config, force)


def _align(project, reference, mask, exhaustive, regions_spec, merge, angular_step, psi_step, max_shift, top_k, memory_budget_gb,
           resume, config, force) -> None:
    cfg, al = stage_config(config, "align", angular_step_deg=angular_step, psi_step_deg=psi_step, max_shift_px=max_shift,
                           memory_budget_gb=memory_budget_gb)
    proj = Project.open(project)
    stage = "align_exhaustive" if exhaustive else "align"
    out_dir = proj.root / stage
    mode = "exhaustive" if exhaustive else "restricted"
    shard_path = _check_can_write(proj, stage, out_dir, regions_spec, merge, force)
    table = star.read_particles(proj.particles_star)
    if merge:
        return _merge(proj, table, stage, out_dir, al, mode)

    centres, ops = project_regions(proj, cfg)
    cands, rows = _candidates(proj, table, len(centres), top_k, exhaustive, regions_spec)
    pre = project_preprocess(proj, config)
    source = ParticleSource(table, pre)
    check_against_project(source, proj, proj.particles_star)
    geo = align_geometry(source, pre, al)
    with Timer() as t:
        user_mask = None if mask is None else mask_at_working_geometry(mask, source.box, source.pixel_ang)
        ref = load_reference(proj, reference, source, pre, config)
        vol, band, ref_filter = search_reference(ref, source.pixel_ang, geo, al.lowpass_resolution_ang, user_mask)
        cand_mat = candidate_matrix([cands[i] for i in rows]) if cands is not None and not exhaustive else None
        chunk = source.chunk_size(al.memory_budget_gb)
        digest = settings_digest(
            mode, al, pre, source.box, source.pixel_ang, round(band, 6), geo.angular_step_deg, geo.psi_step_deg,
            geo.margin_deg, chunk, hashlib.sha256(Path(proj.particles_star).read_bytes()).digest(), array_digest(rows),
            array_digest(vol), array_digest(centres), array_digest(ops), None if cand_mat is None else array_digest(cand_mat))
        store = ChunkStore.for_stage(out_dir, digest, resume)
        res = _align_in_chunks(source, rows, vol, band, cand_mat, centres, ops, geo, al, exhaustive, chunk, store, resume)
        if resume:
            console.print(f"resume: {res['chunks_reused']} of {res['chunks']} chunks reused from {store.folder.relative_to(proj.root)}"
                          + ("" if res["chunks_reused"] else " (none saved with these settings; started from the first chunk)"))
    aligned = with_alignment(table, rows, res["eulers_deg"], res["origins_px"] * source.pixel_ang, res["score"], res["region"])
    summary = _summary(mode, res, t.seconds, ref.description, ref_filter, band, source, geo, al, cand_mat, regions_spec)
    if shard_path is not None:
        star.write_particles(shard_path, aligned)
        write_text_atomic(shard_path.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
        store.remove()
        console.print(f"[green]aligned[/green] shard {regions_spec}: {summary['n_particles']} particles in {t.seconds:.1f} s "
                      f"({summary['particles_per_s']:.1f} particles/s) → {shard_path}")
        return
    outputs = write_stage(out_dir, aligned, summary)
    proj.mark_done(stage, outputs=outputs, seconds=t.seconds, config=al, mode=mode, n_particles=summary["n_particles"],
                   angular_step_deg=summary["angular_step_deg"], psi_step_deg=summary["psi_step_deg"])
    console.print(f"[green]aligned[/green] {summary['n_particles']} particles ({mode}, step {geo.angular_step_deg:.2f}°/"
                  f"{geo.psi_step_deg:.2f}°, {source.box} px at {source.pixel_ang:.3f} Å) in {t.seconds:.1f} s "
                  f"({summary['particles_per_s']:.1f} particles/s), median NCC {summary['median_score']:.3f} → {outputs[0]}")


def _check_can_write(proj: Project, stage: str, out_dir: Path, regions_spec: str | None, merge: bool, force: bool) -> Path | None:
    """The shard's STAR path (None without --regions), after refusing what cannot run: --merge with
    --regions, a done stage or an existing shard without --force, a project without particles."""
    if merge and regions_spec is not None:
        raise DeepAlignError("--merge and --regions: run the shards first, then --merge alone")
    shard = parse_region_spec(regions_spec) if regions_spec is not None else None
    shard_path = out_dir / SHARDS / f"aligned_{regions_spec.replace(',', '_').replace(' ', '')}.star" if shard is not None else None
    if shard is None:
        check_can_run(proj, stage, force)
    elif shard_path.exists() and not force:
        raise DeepAlignError(f"{shard_path}: shard already aligned; use --force to redo")
    if proj.particles_star is None:
        raise DeepAlignError(f"{proj.root}: the project has no particle STAR (deepalign init PROJECT --particles …)")
    return shard_path


def _merge(proj: Project, table: star.ParticleTable, stage: str, out_dir: Path, al, mode: str) -> None:
    """--merge: the shards under out_dir/shards/ → the stage's outputs."""
    with Timer() as t:
        aligned, info = merge_shards(proj, table, out_dir)
    summary = {"mode": mode, "n_particles": len(aligned), **info, "merge_seconds": round(t.seconds, 3)}
    outputs = write_stage(out_dir, aligned, summary)
    proj.mark_done(stage, outputs=outputs, seconds=info["seconds"], config=al, mode=mode, merged_shards=len(info["shards"]))
    console.print(f"[green]merged[/green] {len(info['shards'])} shards, {len(aligned)} particles → {outputs[0]}")


def _candidates(proj: Project, table: star.ParticleTable, n_regions: int, top_k: int | None, exhaustive: bool,
                regions_spec: str | None) -> tuple[list[list[int]] | None, np.ndarray]:
    """(candidate regions of every particle or None, rows of `table` to align: all, or the shard's)."""
    cands = None
    if not exhaustive or regions_spec is not None:
        cands = read_predictions(proj, table, n_regions, top_k, why=" (--regions shards by top-1 region)" if exhaustive else "")
    rows = np.arange(len(table))
    if regions_spec is not None:
        rows = np.flatnonzero(np.isin([c[0] for c in cands], parse_region_spec(regions_spec)))
        if len(rows) == 0:
            raise DeepAlignError(f"--regions {regions_spec}: no particle has its top-1 region in this list")
    return cands, rows


def _align_in_chunks(source: ParticleSource, rows: np.ndarray, vol: np.ndarray, band_ang: float, cand_mat: np.ndarray | None, centres,
                     ops, geo: gallery.SearchGeometry, al, exhaustive: bool, chunk: int, store: ChunkStore, resume: bool) -> dict:
    """align_particles (reference `vol`, ready to search; the score's band to band_ang) over the particles `rows` in fixed chunks of `chunk` (particles with the same
    candidate set side by side), each finished chunk saved to `store` and, with `resume`, loaded
    back instead of recomputed. Returns the RESULT_ARRAYS in the order of `rows`, step_seconds,
    chunks and chunks_reused."""
    pixel = source.pixel_ang
    vol_ft = projector.prepare_volume(vol)
    order = np.lexsort(np.sort(cand_mat, axis=1).T[::-1]) if cand_mat is not None else np.arange(len(rows))
    n = len(rows)
    res = {"eulers_deg": np.zeros((n, 3)), "origins_px": np.zeros((n, 2)), "score": np.zeros(n), "region": np.zeros(n, int),
           "whole_unit": np.zeros(n, bool)}
    starts = range(0, n, chunk)
    reused = 0
    step_seconds = {"project": 0.0, "features": 0.0, "coarse": 0.0, "refine": 0.0}
    table_cache: dict = {}  # the reference table, projected once for all chunks
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"align ({'exhaustive' if exhaustive else 'restricted'})", total=n, rate="")
        for k, start in enumerate(starts):
            local = order[start : start + chunk]
            idx = rows[local]
            out = store.load(k, RESULT_ARRAYS, local=local) if resume else None
            if out is None:
                def tick(done, base=start):
                    bar.update(task, completed=base + done, rate=f"{(base + done) / max(time.perf_counter() - t0, 1e-9):.1f} particles/s")

                out = align_particles(
                    source.read(idx), vol_ft, None if cand_mat is None else cand_mat[local], centres, ops,
                    pixel_size_ang=pixel, angular_step_deg=geo.angular_step_deg, psi_step_deg=geo.psi_step_deg,
                    margin_deg=geo.margin_deg, max_shift_px=al.max_shift_px, ctf_params=source.ctf_params(idx) if al.ctf else None,
                    refine=al.refine, lowpass_resolution_ang=band_ang, memory_budget_gb=al.memory_budget_gb,
                    exhaustive=exhaustive, progress=tick, table_cache=table_cache,
                )
                store.save(k, {"local": local, **{name: out[name] for name in RESULT_ARRAYS}})
                for name, sec in out["seconds"].items():
                    step_seconds[name] += sec
            else:
                reused += 1
                bar.update(task, completed=start + len(local))
            for name in RESULT_ARRAYS:
                res[name][local] = out[name]
    return {**res, "step_seconds": step_seconds, "chunks": len(starts), "chunks_reused": reused}


def _summary(mode: str, res: dict, seconds: float, ref_desc: str, ref_filter: str, band_ang: float, source: ParticleSource,
             geo: gallery.SearchGeometry, al, cand_mat: np.ndarray | None, regions_spec: str | None) -> dict:
    """summary.json of a search (and its notice when particles were searched over the whole asymmetric unit)."""
    n = len(res["score"])
    # restricted: particles whose candidate galleries cost more than the asymmetric unit were searched over it
    whole_unit = 0 if cand_mat is None else int(res["whole_unit"].sum())
    if whole_unit:
        console.print(f"{whole_unit} of {n} particles searched over the whole asymmetric unit: their candidate regions "
                      f"with {geo.margin_deg:.1f}° margins hold as many references (or, in a chunk, all but "
                      f"< {RESTRICTED_MIN_FRACTION:.0%} of the particles did)")
    return {"mode": mode, "n_particles": n, "seconds": round(seconds, 3), "particles_per_s": round(n / max(seconds, 1e-9), 3),
            "reference": ref_desc, "reference_filter": ref_filter, "working_box_px": source.box, "working_pixel_ang": source.pixel_ang,
            "lowpass_resolution_ang": round(band_ang, 3), "angular_step_deg": round(geo.angular_step_deg, 4),
            "psi_step_deg": round(geo.psi_step_deg, 4), "margin_deg": round(geo.margin_deg, 4), "max_shift_px": al.max_shift_px,
            "mean_candidate_regions": None if cand_mat is None else float(np.mean([len(set(c)) for c in cand_mat])),
            "whole_unit_particles": whole_unit, "median_score": float(np.median(res["score"])), "regions": regions_spec,
            "chunks": res["chunks"], "chunks_reused": res["chunks_reused"],
            "step_seconds": {k: round(v, 3) for k, v in res["step_seconds"].items()}}
