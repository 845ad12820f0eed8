"""Xmipp metadata (`.xmd`) ⇄ `ParticleTable`.

An `.xmd` particle file is a STAR-like ``data_noname`` loop with labels ``_image`` (``idx@stack``,
1-based, sometimes with a ``:mrcs`` format suffix), ``_enabled`` (1 / -1), ``_angleRot``,
``_angleTilt``, ``_anglePsi`` (degrees), ``_shiftX``, ``_shiftY`` (pixels), ``_ctfDefocusU/V`` (Å),
``_ctfDefocusAngle`` (degrees), ``_ctfVoltage``, ``_ctfSphericalAberration``, ``_ctfQ0`` and
``_ctfSamplingRate`` (Å/px).

Conventions, checked against Scipion (the converter between the two programs):
``scipion-em-xmipp`` ``xmipp3/convert/convert.py::alignmentToRow`` and ``scipion-em-relion``
``relion/convert/convert31.py::_alignProjToRow`` both turn the same Scipion projection transform
``M`` into ``angles = -euler_from_matrix(inv(M), 'szyz')`` and ``shifts = -translation(inv(M))``;
Xmipp stores ``shifts`` in ``_shiftX/_shiftY`` (pixels) and RELION in ``rlnOriginX/Y`` (pixels;
× pixel size for ``rlnOriginXAngst/YAngst`` in 3.1). So the Euler angles are identical (both ZYZ)
and ``_shiftX = rlnOriginXAngst / pixel``, ``_shiftY = rlnOriginYAngst / pixel``, **same sign**.
``_ctfQ0`` is the amplitude contrast (Scipion maps ``_amplitudeContrast`` ⇄ ``MDL_CTF_Q0``).

Rows with ``_enabled`` ≤ 0 are disabled in Xmipp and are dropped on reading. Other labels are kept
under their Xmipp names and written back by `write_xmd`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..errors import DeepAlignError
from .atomic import atomic_write
from .star import (
    ORIGIN_ANG_COLUMNS,
    ORIGIN_PX_COLUMNS,
    ParticleTable,
    _optics_column,
    pixel_sizes,
    with_pixel_size,
)

XMIPP_HEADER = "# XMIPP_STAR_1 *"
BLOCK_NAME = "noname"

# Xmipp label → RELION column, for the labels that live in data_particles.
_PARTICLE_LABELS = {
    "image": "rlnImageName",
    "angleRot": "rlnAngleRot",
    "angleTilt": "rlnAngleTilt",
    "anglePsi": "rlnAnglePsi",
    "ctfDefocusU": "rlnDefocusU",
    "ctfDefocusV": "rlnDefocusV",
    "ctfDefocusAngle": "rlnDefocusAngle",
}
_SHIFT_LABELS = {"shiftX": "rlnOriginX", "shiftY": "rlnOriginY"}
_OPTICS_LABELS = {"ctfVoltage": "rlnVoltage", "ctfSphericalAberration": "rlnSphericalAberration", "ctfQ0": "rlnAmplitudeContrast"}
PIXEL_LABEL = "ctfSamplingRate"
_FORMAT_SUFFIX = re.compile(r":[A-Za-z0-9]+$")


def _strip_format(name: str) -> str:
    """'1@a.mrc:mrcs' → '1@a.mrcs'-style names without Xmipp's format suffix."""
    return _FORMAT_SUFFIX.sub("", str(name))


def read_xmd(path: Path | str, pixel_size_ang: float | None = None) -> ParticleTable:
    """Read an Xmipp particle `.xmd`. Pixel size: `pixel_size_ang`, else ``_ctfSamplingRate``,
    else unknown (optics None, shifts kept in pixels as rlnOriginX/Y until `with_pixel_size`)."""
    path = Path(path)
    if not path.exists():
        raise DeepAlignError(f"{path}: file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # starfile raises assorted parser errors on malformed text
        raise DeepAlignError(f"{path}: not a readable Xmipp metadata file ({type(e).__name__})")
    frames = [b for b in blocks.values() if isinstance(b, (pd.DataFrame, dict))]
    if not frames:
        raise DeepAlignError(f"{path}: no data block found")
    block = blocks.get(BLOCK_NAME, frames[0])
    df = block.reset_index(drop=True) if isinstance(block, pd.DataFrame) else pd.DataFrame({k: [v] for k, v in block.items()})
    if "image" not in df:
        raise DeepAlignError(f"{path}: no _image label; expected Xmipp particle metadata")
    if "enabled" in df:
        df = df[df["enabled"].astype(float) > 0].drop(columns=["enabled"]).reset_index(drop=True)
    if len(df) == 0:
        raise DeepAlignError(f"{path}: no enabled particles")

    out = pd.DataFrame({"rlnImageName": [_strip_format(x) for x in df["image"]]})
    for label, col in {**_PARTICLE_LABELS, **_SHIFT_LABELS, **_OPTICS_LABELS}.items():
        if label in df and label != "image":
            out[col] = df[label].to_numpy(float)
    pixel = pixel_size_ang
    if pixel is None and PIXEL_LABEL in df:
        values = df[PIXEL_LABEL].to_numpy(float)
        if not np.allclose(values, values[0]):
            raise DeepAlignError(f"{path}: _ctfSamplingRate differs between particles; pass --angpix")
        pixel = float(values[0])
    known = {"image", PIXEL_LABEL, *_PARTICLE_LABELS, *_SHIFT_LABELS, *_OPTICS_LABELS}
    for label in df.columns:
        if label not in known:
            out[label] = df[label].to_numpy()
    table = ParticleTable(out, None, path)
    return with_pixel_size(table, pixel) if pixel is not None else table


def write_xmd(path: Path | str, table: ParticleTable) -> None:
    """Write a table as an Xmipp particle `.xmd` (``data_noname`` loop), atomically.

    Shifts are written in pixels (origin Å / pixel size; same sign, see the module docstring).
    """
    path = Path(path)
    df = table.particles
    if "rlnImageName" not in df:
        raise DeepAlignError(f"{table.name}: no rlnImageName column; the particles need images")
    n = len(df)
    cols: dict[str, np.ndarray] = {"image": df["rlnImageName"].astype(str).to_numpy(), "enabled": np.ones(n, dtype=int)}
    for label, col in _PARTICLE_LABELS.items():
        if label != "image" and col in df and not col.startswith("rlnDefocus"):
            cols[label] = df[col].to_numpy(float)
    has_ang = all(c in df for c in ORIGIN_ANG_COLUMNS)
    pixel = None
    if has_ang or table.optics is not None:
        pixel = pixel_sizes(table)
    if has_ang:
        cols["shiftX"] = df[ORIGIN_ANG_COLUMNS[0]].to_numpy(float) / pixel
        cols["shiftY"] = df[ORIGIN_ANG_COLUMNS[1]].to_numpy(float) / pixel
    elif all(c in df for c in ORIGIN_PX_COLUMNS):
        cols["shiftX"] = df[ORIGIN_PX_COLUMNS[0]].to_numpy(float)
        cols["shiftY"] = df[ORIGIN_PX_COLUMNS[1]].to_numpy(float)
    for label, col in _PARTICLE_LABELS.items():
        if col.startswith("rlnDefocus") and col in df:
            cols[label] = df[col].to_numpy(float)
    for label, col in _OPTICS_LABELS.items():
        values = _optics_column(table, col)
        if values is not None:
            cols[label] = np.asarray(values, dtype=float)
    if pixel is not None:
        cols[PIXEL_LABEL] = pixel
    for col in df.columns:
        if not col.startswith("rln") and col not in cols:
            cols[col] = df[col].to_numpy()
    lines = [XMIPP_HEADER, "#", f"data_{BLOCK_NAME}", "loop_"]
    lines += [f" _{label}" for label in cols]
    formatted = [_format_column(v) for v in cols.values()]
    lines += [" " + " ".join(row) for row in zip(*formatted)]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _format_column(values: np.ndarray) -> list[str]:
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return [f"{v:.6f}" for v in values]
    if values.dtype.kind in "iub":
        return [str(int(v)) for v in values]
    return [_quote(str(v)) for v in values]


def _quote(text: str) -> str:
    return f'"{text}"' if (not text or any(ch.isspace() for ch in text)) else text
