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
import time
from pathlib import Path

import jax
import numpy as np
import typer

from .. import plots
from ..config import PreprocessConfig, ReconstructConfig
from ..core import preprocess, reconstruction
from ..errors import DeepAlignError
from ..io import mrc, star
from ..io.atomic import staged_dir, write_text_atomic
from ..io.particles import read_any
from ..io.project import Project
from ..particles import ParticleSource, check_against_project
from ._common import CONFIG_OPT, FORCE_OPT, PROJECT_ARG, Timer, console, progress, stage_config

DEFAULT_NAME = "aligned"
STAGE = "reconstruct"
IMAGE_CHUNK_BUDGET_GB = 1.0  # prepared images held at once; the (2N)³ grids come on top


def project_preprocess(proj: Project, config_path: Path | None) -> PreprocessConfig:
    """The preprocess config images are prepared with: the --config file's when given, else the
    one the project recorded (so align sees what train/predict saw), else the defaults. A --config
    that differs from the recorded one gets a warning (the working images would differ)."""
    recorded = proj.stage_config("preprocess")
    if config_path is None:
        return PreprocessConfig.model_validate(recorded) if recorded else PreprocessConfig()
    _, pre = stage_config(config_path, "preprocess")
    if recorded and PreprocessConfig.model_validate(recorded) != pre:
        console.print(f"[yellow]warning:[/yellow] {config_path}: preprocess differs from the one recorded in {proj.yaml_path}; "
                      "images are prepared as the config says")
    return pre


def reconstruct_particles(source: ParticleSource, eulers_deg: np.ndarray, origins_ang: np.ndarray, rec: ReconstructConfig,
                          description: str = "reconstruct") -> dict:
    """Half maps and full map (working box and pixel) of the particles of `source`, streamed.

    eulers_deg: (n, 3) RELION angles.  origins_ang: (n, 2) RELION origins in Å.
    Returns dict: map, half1, half2 ((N, N, N) float32), freqs (cycles/px), fsc, resolution_ang.
    """
    n, pixel = len(source), source.pixel_ang
    perm = np.asarray(jax.random.permutation(jax.random.PRNGKey(rec.seed), n))
    half = np.zeros(n, int)
    half[perm[n // 2 :]] = 1
    origins_px = np.asarray(origins_ang, float) / pixel
    ctf_all = source.ctf_params()
    if n < 2:
        raise DeepAlignError(f"{source.table.name}: {n} particle; two half sets need at least 2")
    grids = [None, None]
    t0, done = time.perf_counter(), 0
    with progress(transient=True) as bar:
        task = bar.add_task(description, total=n, rate="")
        for idx, images in source.iter_chunks(source.chunk_size(IMAGE_CHUNK_BUDGET_GB)):
            for h in (0, 1):
                local = np.flatnonzero(half[idx] == h)
                if len(local) == 0:
                    continue
                rows = idx[local]
                ctf = None if ctf_all is None else source.ctf_params(rows)
                num, wt = reconstruction.backproject(images[local], eulers_deg[rows], origins_px[rows], ctf, pixel)
                grids[h] = (num, wt) if grids[h] is None else (grids[h][0] + num, grids[h][1] + wt)
            done += len(idx)
            bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.0f} particles/s")

    def finish(num, wt):
        return np.asarray(reconstruction.finalize(num, wt, box=source.box, wiener_constant=rec.wiener_constant))

    half1, half2 = finish(*grids[0]), finish(*grids[1])
    full = finish(grids[0][0] + grids[1][0], grids[0][1] + grids[1][1])
    freqs, curve = reconstruction.fsc(half1, half2)
    return {"map": full, "half1": half1, "half2": half2, "freqs": freqs, "fsc": curve,
            "resolution_ang": reconstruction.resolution_at(freqs, curve, pixel)}


def _fsc_png(path: Path, freqs_per_ang: np.ndarray, curve: np.ndarray, resolution_ang: float, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(freqs_per_ang[1:], curve[1:], lw=1.5, color="tab:blue")
    ax.axhline(reconstruction.FSC_THRESHOLD, color="tab:red", ls="--", lw=1, label=f"FSC = {reconstruction.FSC_THRESHOLD}")
    ax.axvline(1.0 / resolution_ang, color="tab:gray", ls=":", lw=1, label=f"{resolution_ang:.1f} Å")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC (half maps)")
    ax.set_ylim(min(-0.1, float(np.min(curve[1:]))), 1.05)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    plots.save(fig, path)


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
        rows = ["shell,frequency_per_ang,resolution_ang,fsc"]
        rows += [f"{i},{fa:.6f},{(1 / fa if fa > 0 else float('inf')):.3f},{c:.6f}" for i, (fa, c) in enumerate(zip(freqs_ang, result["fsc"]))]
        write_text_atomic(tmp / "fsc.csv", "\n".join(rows) + "\n")
        _fsc_png(tmp / "fsc.png", freqs_ang, result["fsc"], res, f"{name}: {len(table)} particles, {res:.1f} Å at FSC 0.143")
        write_text_atomic(tmp / "summary.json", json.dumps(summary, indent=2) + "\n")
    proj.mark_done(stage, outputs=[out_dir / f for f in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.csv", "fsc.png", "summary.json")],
                   seconds=t.seconds, config=rec, name=name, resolution_ang=round(res, 3), n_particles=len(table))
    console.print(f"[green]reconstructed[/green] {len(table)} particles ({source.box} px, {pixel:.3f} Å/px): "
                  f"resolution {res:.2f} Å at FSC {reconstruction.FSC_THRESHOLD} (Nyquist {2 * pixel:.2f} Å) → {out_dir}/map.mrc")
