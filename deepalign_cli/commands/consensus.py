"""Keep the particles whose poses from several methods agree (paper §2.5, consensus tool).

    deepalign consensus deepalign.star relion.star --threshold 5 --sym C1
    deepalign consensus a.star b.cs c.xmd --mode direction --keep-from 1 --out agreed/
    deepalign consensus demo/align/aligned.star truth.star --project demo --config cfg.yaml

Inputs are RELION .star, cryoSPARC .cs or Xmipp .xmd files. Particles are matched by rlnImageName
compared as (image index, stack file name): '000001@Extract/a.mrcs' and '1@/data/Extract/a.mrcs'
are the same image (more of the path is compared only when two stacks of one input share a file
name). The difference per particle is the full-rotation geodesic angle (--mode rotation) or the
projection-direction angle (--mode direction, psi ignored), minimised over the symmetry group; a
particle is kept when every pair of inputs agrees within --threshold degrees.

Writes to --out (default: consensus/ beside the first input, or PROJECT/consensus):
consensus.star (kept particles, every column and the poses of input --keep-from), differences.csv
(per particle and pair), summary.json (kept/total per pair and overall), differences.png (sorted
differences with the threshold) and missing.txt (particles absent from some input; they are
counted, never silently dropped). Nothing is written unless everything succeeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from ..config import load_config, override
from ..core import consensus as core
from ..core.symmetry import UnknownSymmetry, canonical_name, symmetry_operators
from ..errors import DeepAlignError
from ..io.atomic import atomic_write
from ..io.particles import read_any
from ..io.project import Project
from ..io.star import ParticleTable, get_poses, image_names, write_particles


def _read(path: Path) -> ParticleTable:
    """A non-empty particle table from .star, .cs (cryoSPARC) or .xmd (Xmipp), by extension."""
    if not path.is_file():
        raise DeepAlignError(f"{path}: file not found")
    table = read_any(path)
    if len(table) == 0:
        raise DeepAlignError(f"{path}: the particle table is empty")
    return table


def _match(tables: list[ParticleTable]):
    names = [np.array(image_names(t), dtype=object) for t in tables]
    try:
        common, indices, missing = core.match_by_name(names)
    except core.DuplicateNames as e:
        raise DeepAlignError(f"{tables[e.args[0]].name}: image {e.args[1]} appears twice; consensus needs one pose per particle")
    except core.BadImageName as e:
        raise DeepAlignError(f"{tables[e.args[0]].name}: rlnImageName '{e.args[1]}' is not 'index@stack'")
    if len(common) == 0:
        raise DeepAlignError(f"{tables[0].name}: no particle (rlnImageName) is common to all {len(tables)} inputs")
    return common, indices, missing


def _sorted_differences_png(path: Path, pairwise: dict, labels: list[str], threshold_deg: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (i, j), d in pairwise.items():
        frac = 100.0 * (np.arange(len(d)) + 1) / len(d)
        ax.plot(frac, np.sort(d), lw=1.5, label=f"{labels[i]} vs {labels[j]}")
    ax.axhline(threshold_deg, color="tab:red", ls="--", lw=1, label=f"threshold {threshold_deg:g}°")
    ax.set_xlabel("particles, sorted by difference (%)")
    ax.set_ylabel("angular difference (°)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def _write_all(out: Path, writers: dict) -> None:
    """Write every output to a temporary file first; rename them all only if all succeeded."""
    created = not out.exists()
    try:
        with contextlib.ExitStack() as stack:
            for name, write in writers.items():
                write(stack.enter_context(atomic_write(out / name)))
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _summary(inputs: list[Path], sym: str, ccfg, keep_from: int, mask, pairwise: dict, missing: list) -> dict:
    """summary.json contents: kept / total per pair and overall, missing counts per input."""
    pairs = [
        {"a": i, "b": j, "kept": int((d <= ccfg.threshold_deg).sum()), "total": len(d), "median_deg": float(np.median(d))}
        for (i, j), d in pairwise.items()
    ]
    return {
        "inputs": [str(p) for p in inputs],
        "symmetry": sym,
        "mode": ccfg.mode,
        "threshold_deg": ccfg.threshold_deg,
        "keep_from": keep_from,
        "total": len(mask),
        "kept": int(mask.sum()),
        "fraction_kept": float(mask.mean()),
        "pairs": pairs,
        "missing": [{"input": str(p), "count": len(m)} for p, m in zip(inputs, missing)],
    }


def _print_summary(summary: dict, labels: list[str], out: Path) -> None:
    table = Table(title=f"consensus ({summary['mode']}, {summary['symmetry']}, ≤ {summary['threshold_deg']:g}°)")
    for col in ("pair", "kept / total", "kept %", "median diff (°)"):
        table.add_column(col, justify="left" if col == "pair" else "right")
    for p in summary["pairs"]:
        table.add_row(f"{labels[p['a']]} vs {labels[p['b']]}", f"{p['kept']} / {p['total']}", f"{100 * p['kept'] / p['total']:.1f}", f"{p['median_deg']:.2f}")
    table.add_row("all pairs agree", f"{summary['kept']} / {summary['total']}", f"{100 * summary['fraction_kept']:.1f}", "", style="bold")
    console = Console()
    console.print(table)
    for m in summary["missing"]:
        if m["count"]:
            console.print(f"[yellow]{m['count']} particles of the other inputs are missing from {m['input']}[/yellow] (listed in {out / 'missing.txt'})")
    console.print(f"wrote {out / 'consensus.star'} ({summary['kept']} particles), differences.csv, summary.json, differences.png, missing.txt")


def _default_symmetry(sym: str | None, proj: Project | None, config: Path | None, cfg) -> str:
    """--sym, else (without --config) the project's regions.symmetry, else the config's regions.symmetry."""
    if sym is not None:
        return sym
    from_project = (proj.stage_config("regions") or {}).get("symmetry") if proj is not None and config is None else None
    return from_project or cfg.regions.symmetry


def _check_inputs(inputs: list[Path], keep_from: int) -> None:
    """At least two inputs, and --keep-from one of their indices."""
    if len(inputs) < 2:
        raise DeepAlignError(f"{inputs[0] if inputs else 'consensus'}: give at least two particle files to compare")
    if not 0 <= keep_from < len(inputs):
        raise DeepAlignError(f"--keep-from {keep_from}: must be an input index between 0 and {len(inputs) - 1}")


def _symmetry(sym_name: str):
    """Canonical point-group name and its operators (a one-line error for an unknown name)."""
    try:
        sym_name = canonical_name(sym_name)
        return sym_name, symmetry_operators(sym_name)
    except UnknownSymmetry:
        raise DeepAlignError(f"--sym {sym_name}: unknown symmetry (RELION names: C1, Cn, Dn, T, O, I1, I2)")


def _compare(inputs: list[Path], ops, ccfg):
    """Read and match the inputs; the tables, match indices, missing names, kept mask and pairwise differences."""
    tables = [_read(p) for p in inputs]
    eulers = [get_poses(t, hint="consensus compares poses")[0] for t in tables]
    _, indices, missing = _match(tables)
    mask, pairwise = core.consensus_mask([e[idx] for e, idx in zip(eulers, indices)], ops, ccfg.threshold_deg, ccfg.mode)
    return tables, indices, missing, mask, pairwise


def _kept_table(table: ParticleTable, rows, mask) -> ParticleTable:
    """The rows of the --keep-from input (matched order) whose poses agree."""
    kept = table.copy()
    kept.particles = kept.particles.iloc[rows[mask]].reset_index(drop=True)
    return kept


def _differences_frame(table: ParticleTable, rows, pairwise: dict, mask) -> pd.DataFrame:
    """differences.csv: image name, difference per pair (degrees) and whether the particle is kept."""
    diff_frame = pd.DataFrame({"rlnImageName": table.particles["rlnImageName"].to_numpy()[rows]})
    for (i, j), d in pairwise.items():
        diff_frame[f"diff_{i}_{j}_deg"] = np.round(d, 4)
    diff_frame["kept"] = mask.astype(int)
    return diff_frame


def _writers(kept: ParticleTable, diff_frame: pd.DataFrame, summary: dict, missing_lines: list[str],
             pairwise: dict, labels: list[str], threshold_deg: float) -> dict:
    """Output file name → function writing it to a temporary path."""
    return {
        "differences.png": lambda tmp: _sorted_differences_png(tmp, pairwise, labels, threshold_deg),
        "consensus.star": lambda tmp: write_particles(tmp, kept),
        "differences.csv": lambda tmp: diff_frame.to_csv(tmp, index=False),
        "summary.json": lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"),
        "missing.txt": lambda tmp: tmp.write_text("\n".join(missing_lines) + "\n"),
    }


def command(
    inputs: Annotated[list[Path], typer.Argument(help="two or more particle files (.star, .cs, .xmd)")],
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="keep particles whose differences are all ≤ this (degrees) (default: config consensus.threshold_deg, 5)")] = None,
    sym: Annotated[Optional[str], typer.Option("--sym", help="point group (C1, Cn, Dn, T, O, I1, I2) (default: config regions.symmetry, C1)")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="rotation (full pose) or direction (projection direction only)")] = None,
    keep_from: Annotated[int, typer.Option("--keep-from", help="index of the input whose rows and poses are written")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default: consensus/ beside the first input)")] = None,
    project: Annotated[Optional[Path], typer.Option("--project", help="project folder: output to PROJECT/consensus, symmetry from its regions config")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML config (consensus:, regions: sections)")] = None,
) -> None:
    """Keep the particles whose poses from several methods agree within a threshold.

    deepalign consensus deepalign.star relion.star --threshold 5 --sym C1
    deepalign consensus a.star b.cs c.xmd --mode direction --keep-from 1 --out agreed/
    """
    started = time.perf_counter()
    cfg = load_config(config)
    ccfg = override(cfg.consensus, threshold_deg=threshold, mode=mode)
    proj = Project.open(project) if project is not None else None
    sym_name = _default_symmetry(sym, proj, config, cfg)
    _check_inputs(inputs, keep_from)
    sym_name, ops = _symmetry(sym_name)
    out = out or (proj.root / "consensus" if proj is not None else inputs[0].parent / "consensus")

    tables, indices, missing, mask, pairwise = _compare(inputs, ops, ccfg)
    labels = [f"{k}:{p.name}" for k, p in enumerate(inputs)]
    kept = _kept_table(tables[keep_from], indices[keep_from], mask)
    diff_frame = _differences_frame(tables[keep_from], indices[keep_from], pairwise, mask)
    summary = _summary(inputs, sym_name, ccfg, keep_from, mask, pairwise, missing)
    missing_lines = ["missing_from\trlnImageName"] + [f"{p}\t{name}" for p, m in zip(inputs, missing) for name in m]

    writers = _writers(kept, diff_frame, summary, missing_lines, pairwise, labels, ccfg.threshold_deg)
    _write_all(out, writers)

    if proj is not None:
        proj.mark_done("consensus", outputs=[out / name for name in writers], seconds=time.perf_counter() - started, config=ccfg)

    _print_summary(summary, labels, out)
