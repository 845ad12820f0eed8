"""Fourier reconstruction with Wiener CTF correction, gold-standard half maps and FSC.

Examples:

    deepalign reconstruct demo                                   # demo/align/aligned.star
    deepalign reconstruct demo --from demo/label/labels.star --out reference
    deepalign reconstruct demo --from demo/simulated/truth.star --lowpass 20
    deepalign reconstruct demo --from demo/align_exhaustive/aligned.star --out exhaustive --force

Images are prepared exactly as train/predict/align see them (Fourier crop to the working pixel
size of the preprocess config, background normalisation) and streamed in chunks, so the map has
the working box and pixel size (written in the MRC header). The particles are split at random
(reconstruct.seed) into two halves; each half is back-projected on its own and the full map comes
from the summed grids. Writes PROJECT/reconstruct/NAME/: map.mrc (low-passed when --lowpass is
given), half1.mrc, half2.mrc (never filtered), fsc.csv, fsc.png (with the 0.143 line) and
summary.json (resolution, particle count). NAME defaults to 'aligned' for align/aligned.star and
to the STAR file's stem otherwise; `--out reference` builds the reference that `align` uses by
default. The folder appears whole or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from .. import plots
from ..core import preprocess, reconstruction
from ..errors import DeepAlignError
from ..io import mrc, star
from ..io.atomic import staged_dir, write_text_atomic
from ..io.particles import read_any
from ..io.project import Project
from ..particles import ParticleSource, check_against_project
from ._common import CONFIG_OPT, FORCE_OPT, PROJECT_ARG, Timer, console, stage_config
from ._reconstruction import fsc_csv, project_preprocess, reconstruct_particles

DEFAULT_NAME = "aligned"
STAGE = "reconstruct"


def command(
    project: Path = PROJECT_ARG,
    from_star: Path = typer.Option(None, "--from", help="particles with poses (default: PROJECT/align/aligned.star)", show_default=False),
    out: str = typer.Option(None, "--out", help="output name: PROJECT/reconstruct/NAME/ (default: aligned, or the STAR stem)", show_default=False),
    lowpass: float = typer.Option(None, "--lowpass", help="low-pass the written map.mrc to this resolution (Å); half maps stay unfiltered", show_default=False),
    config: Path = CONFIG_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Fourier reconstruction with CTF correction and half-set FSC; prints the resolution."""
    _, rec = stage_config(config, "reconstruct")
    proj = Project.open(project)
    if lowpass is not None and lowpass <= 0:
        raise DeepAlignError(f"--lowpass {lowpass:g}: must be a positive resolution in Å")
    path = Path(from_star) if from_star is not None else proj.output("align", "aligned.star")
    default_from = path.resolve() == (proj.root / "align" / "aligned.star").resolve()
    name = out or (DEFAULT_NAME if default_from else path.stem)
    if not name or "/" in name or name.startswith("."):
        raise DeepAlignError(f"--out {name!r}: expected a plain folder name such as 'reference'")
    stage = STAGE if name == DEFAULT_NAME else f"{STAGE}_{name}"
    out_dir = proj.root / "reconstruct" / name
    if (proj.is_done(stage) or out_dir.exists()) and not force:
        raise DeepAlignError(f"{out_dir}: already reconstructed; use --force to redo (or --out another name)")
    if not path.is_file():
        raise DeepAlignError(f"{path}: file not found")
    pre = project_preprocess(proj, config)
    with Timer() as t:
        table = read_any(path)
        eulers, origins = star.get_poses(table, hint="reconstruct needs particles with poses")
        source = ParticleSource(table, pre)
        check_against_project(source, proj, path)
        result = reconstruct_particles(source, eulers, origins, rec, description=f"reconstruct {name}")
        pixel = source.pixel_ang
        written = result["map"]
        if lowpass is not None:
            written = np.asarray(preprocess.lowpass_volume(written, pixel, lowpass))
    res = result["resolution_ang"]
    freqs_ang = result["freqs"] / pixel
    summary = {"name": name, "from": str(path.resolve()), "n_particles": len(table), "resolution_ang": round(res, 3),
               "fsc_threshold": reconstruction.FSC_THRESHOLD, "box_px": source.box, "pixel_size_ang": pixel,
               "nyquist_ang": 2 * pixel, "lowpass_ang": lowpass, "ctf_corrected": source.ctf_params() is not None,
               "seconds": round(t.seconds, 3)}
    with staged_dir(out_dir) as tmp:
        mrc.write_map(tmp / "map.mrc", written, pixel)
        mrc.write_map(tmp / "half1.mrc", result["half1"], pixel)
        mrc.write_map(tmp / "half2.mrc", result["half2"], pixel)
        write_text_atomic(tmp / "fsc.csv", fsc_csv(freqs_ang, result["fsc"]))
        plots.fsc_curve(tmp / "fsc.png", freqs_ang, result["fsc"], res, f"{name}: {len(table)} particles, {res:.1f} Å at FSC 0.143")
        write_text_atomic(tmp / "summary.json", json.dumps(summary, indent=2) + "\n")
    proj.mark_done(stage, outputs=[out_dir / f for f in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.csv", "fsc.png", "summary.json")],
                   seconds=t.seconds, config=rec, name=name, resolution_ang=round(res, 3), n_particles=len(table))
    console.print(f"[green]reconstructed[/green] {len(table)} particles ({source.box} px, {pixel:.3f} Å/px): "
                  f"resolution {res:.2f} Å at FSC {reconstruction.FSC_THRESHOLD} (Nyquist {2 * pixel:.2f} Å) → {out_dir}/map.mrc")
