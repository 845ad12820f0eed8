"""Read a particle file of any supported format by its suffix.

``.star`` (RELION 3.0/3.1+), ``.cs`` (cryoSPARC, optional passthrough), ``.xmd`` (Xmipp). All
return a `ParticleTable` in RELION 3.1 names; `angpix` (the ``--angpix`` flag) overrides or
supplies the pixel size.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DeepAlignError
from .star import ParticleTable, read_particles, with_pixel_size

SUFFIXES = (".star", ".cs", ".xmd")


def read_any(path: Path | str, passthrough: Path | str | None = None, angpix: float | None = None) -> ParticleTable:
    """Particle table from a .star, .cs or .xmd file (by suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        table = read_particles(path)
    elif suffix == ".cs":
        from .cryosparc import read_cs

        table = read_cs(path, passthrough)
    elif suffix == ".xmd":
        from .xmipp import read_xmd

        table = read_xmd(path)
    else:
        raise DeepAlignError(f"{path}: unknown particle file type '{path.suffix}'; expected one of {', '.join(SUFFIXES)}")
    if passthrough is not None and suffix != ".cs":
        raise DeepAlignError(f"{passthrough}: a passthrough file only goes with a cryoSPARC .cs file")
    return with_pixel_size(table, angpix) if angpix is not None else table
