"""Create a project directory for a particle set.

Examples:

    deepalign init ribo --particles Extract/job012/particles.star
    deepalign init ribo --particles particles.star --angpix 1.34 --config configs/ribosome.yaml

The particle STAR (RELION 3.0 or 3.1+) is referenced, not copied; its pixel size (optics table, or
--angpix), box and image stacks (each exists, is an MRC stack of the optics group's box and holds
the indices named; headers only) are checked now, so a bad input fails before any stage runs and
before the project folder is touched.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import load_config
from ..io import star
from ..io.project import Project
from ..io.stacks import check_stacks
from ._common import CONFIG_OPT, PROJECT_ARG, console, removed_on_failure


def command(
    project: Path = PROJECT_ARG,
    particles: Path = typer.Option(..., "--particles", "-p", help="particle STAR (all particles to align)", show_default=False),
    angpix: float = typer.Option(None, "--angpix", help="pixel size in Å when the STAR has none", show_default=False),
    config: Path = CONFIG_OPT,
) -> None:
    """Create a project directory from a particle STAR."""
    cfg = load_config(config)
    table = star.read_particles(particles)
    if angpix is not None:
        table = star.with_pixel_size(table, angpix)
    star.pixel_size(table)  # the STAR's own problems (no pixel size, mixed optics) come first
    check_stacks(table, star.box_size(table))
    with removed_on_failure(project):
        proj = Project.create(project, particles_star=particles, angpix=angpix, config=cfg)
    inp = proj.inputs
    console.print(f"[green]project[/green] {proj.root}: {inp.get('n_particles')} particles, box {inp.get('box_px')} px, "
                  f"{inp.get('pixel_size_ang')} Å/px")
