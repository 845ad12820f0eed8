"""Label the pre-aligned subset with the region of each particle's projection direction.

Examples:

    deepalign label demo --subset demo/simulated/subset.star
    deepalign label ribo --subset relion_refine/run_data.star --spacing 30 --sym C1
    deepalign label prot --subset cryosparc_P1_J20_particles.cs --sym D7 --spacing 20
    deepalign label prot --subset highres/images.xmd --config configs/proteasome_d7.yaml

The subset may be a RELION STAR (3.0 or 3.1+), a cryoSPARC .cs or an Xmipp .xmd. Its image stacks
are checked from their headers before anything is written: each exists, holds the indices named
and has the subset's box (rlnImageSize, else the project's). psi does not matter: a particle's
region is the centre nearest to its projection direction over the symmetry copies. Writes
PROJECT/label/labels.star (the subset + rlnDeepAlignRegion, rlnDeepAlignRegionDist), regions.csv
(centre and particle count per region) and regions.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import typer

from .. import plots
from ..core import geometry, regions
from ..errors import DeepAlignError
from ..io import star
from ..io.atomic import atomic_write, staged_dir
from ..io.particles import read_any
from ..io.project import Project
from ..io.stacks import check_stacks
from ._common import check_can_run, CONFIG_OPT, FORCE_OPT, PROJECT_ARG, Timer, console, stage_config
from .symmetry_arg import operators_for

PIXEL_RTOL = 1e-3  # subset and project pixel sizes agree to 0.1 % (STAR files print ~6 digits)


def region_table(centres: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    rot, tilt = geometry.direction_to_angles(centres)
    return pd.DataFrame({"region": np.arange(len(centres)), "rot_deg": np.round(rot, 4), "tilt_deg": np.round(tilt, 4),
                         "x": centres[:, 0], "y": centres[:, 1], "z": centres[:, 2], "n_particles": counts})


def check_pixel_size(subset: Path, table: star.ParticleTable, proj: Project) -> None:
    """The subset must be at the project's pixel size: labels.star is written with the project's
    optics, so a subset at another pixel size would get wrong shifts (Å → px) silently."""
    if table.optics is None or proj.pixel_size_ang is None:
        return
    sub_pixel = star.pixel_size(table)
    if not np.isclose(sub_pixel, proj.pixel_size_ang, rtol=PIXEL_RTOL):
        raise DeepAlignError(f"{subset}: pixel size {sub_pixel:g} Å differs from the project's {proj.pixel_size_ang:g} Å "
                             f"({proj.particles_star}); give the subset of the same particles (or --angpix if its header is wrong)")


def command(
    project: Path = PROJECT_ARG,
    subset: Path = typer.Option(..., "--subset", "-s", help="pre-aligned particles: .star, .cs or .xmd", show_default=False),
    passthrough: Path = typer.Option(None, "--passthrough", help="cryoSPARC passthrough .cs (CTF, image paths)", show_default=False),
    spacing: float = typer.Option(None, "--spacing", help="degrees between region centres (30 → 42 regions, 20 → 92)", show_default=False),
    sym: str = typer.Option(None, "--sym", help="symmetry: C1, Cn, Dn, T, O, I1, I2", show_default=False),
    angpix: float = typer.Option(None, "--angpix", help="pixel size (Å) when the subset file has none", show_default=False),
    config: Path = CONFIG_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Assign the pre-aligned subset to projection-direction regions."""
    cfg, reg = stage_config(config, "regions", spacing_deg=spacing, symmetry=sym)
    lab = cfg.label
    proj = Project.open(project)
    check_can_run(proj, "label", force)
    ops, sym_name = operators_for(reg.symmetry)
    reg = reg.model_copy(update={"symmetry": sym_name})
    with Timer() as t:
        table = read_any(subset, passthrough=passthrough, angpix=angpix)
        if len(table) == 0:
            raise DeepAlignError(f"{subset}: no particles")
        check_pixel_size(subset, table, proj)
        eulers, _ = star.get_poses(table, hint="label needs a pre-aligned subset with angles")
        check_stacks(table, star.box_size(table) or proj.box_px)
        centres = regions.region_centres(reg.spacing_deg, ops)
        if len(centres) == 0:
            raise DeepAlignError(f"--spacing {reg.spacing_deg}: gives 0 regions in the {sym_name} asymmetric unit; use a smaller spacing")
        dirs = geometry.projection_direction(eulers[:, 0], eulers[:, 1])
        idx, dist = regions.assign_regions(dirs, centres, ops)
        counts = np.bincount(idx, minlength=len(centres))
        # labels.star lives in PROJECT/label/: its image names must find the stacks from there
        labelled = star.rebase_image_names(table, proj.root / "label", proj.root)
        labelled.particles["rlnDeepAlignRegion"] = idx.astype(int)
        labelled.particles["rlnDeepAlignRegionDist"] = np.round(dist, 4)
        rt = region_table(centres, counts)
        with staged_dir(proj.root / "label") as tmp:
            star.write_particles(tmp / "labels.star", labelled, pixel_size_ang=proj.pixel_size_ang, box=proj.box_px)
            with atomic_write(tmp / "regions.csv") as f:
                rt.to_csv(f, index=False)
            plots.region_counts(tmp / "regions.png", counts, rt[["rot_deg", "tilt_deg"]].to_numpy(), lab.min_particles_per_region,
                                f"{len(table)} labelled particles, {len(centres)} regions ({sym_name}, {reg.spacing_deg:g}°)")
    proj.record_config("regions", reg)
    out = proj.root / "label"
    proj.mark_done("label", outputs=[out / "labels.star", out / "regions.csv", out / "regions.png"], seconds=t.seconds,
                   config=lab, subset=str(Path(subset).resolve()), n_regions=int(len(centres)))
    few = np.flatnonzero(counts < lab.min_particles_per_region)
    console.print(f"[green]labelled[/green] {len(table)} particles into {len(centres)} regions ({sym_name}, {reg.spacing_deg:g}°); "
                  f"median {int(np.median(counts))} per region → {out}/labels.star")
    if len(few):
        console.print(f"[yellow]warning:[/yellow] {len(few)} region(s) have fewer than {lab.min_particles_per_region} particles "
                      f"({', '.join(f'{i}:{counts[i]}' for i in few[:20])}{' …' if len(few) > 20 else ''}); "
                      "train augments what exists or skips regions below train.min_positives")
