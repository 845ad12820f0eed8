"""Create a project directory for a particle set.

Examples:

    deepalign init ribo --particles Extract/job012/particles.star
    deepalign init ribo --particles particles.star --angpix 1.34 --config configs/ribosome.yaml

The particle STAR (RELION 3.0 or 3.1+) is referenced, not copied; its pixel size (optics table, or
--angpix) and box are checked now, so a bad input fails before any stage runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import load_config
from ..io.project import Project
from ._common import CONFIG_OPT, PROJECT_ARG, console, removed_on_failure


def command(
    project: Path = PROJECT_ARG,
    particles: Path = typer.Option(..., "--particles", "-p", help="particle STAR (all particles to align)", show_default=False),
    angpix: float = typer.Option(None, "--angpix", help="pixel size in Å when the STAR has none", show_default=False),
    config: Path = CONFIG_OPT,
) -> None:
    """Create a project directory from a particle STAR."""
    cfg = load_config(config)
    with removed_on_failure(project):
        proj = Project.create(project, particles_star=particles, angpix=angpix, config=cfg)
    inp = proj.inputs
    console.print(f"[green]project[/green] {proj.root}: {inp.get('n_particles')} particles, box {inp.get('box_px')} px, "
                  f"{inp.get('pixel_size_ang')} Å/px")
