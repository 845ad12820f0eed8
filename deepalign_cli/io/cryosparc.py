"""cryoSPARC particle files (`.cs`) → `ParticleTable`.

A `.cs` file is ``np.save`` of a numpy record array, one record per particle. Fields used:
``blob/path`` (bytes, relative to the cryoSPARC project; a leading ``>`` marks imported files),
``blob/idx`` (0-based), ``blob/psize_A``, ``blob/shape``, ``alignments3D/pose`` (axis-angle
rotation vector, radians), ``alignments3D/shift`` (pixels), ``alignments3D/psize_A``,
``ctf/df1_A``, ``ctf/df2_A``, ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``,
``ctf/amp_contrast`` (and ``ctf/phase_shift_rad`` when present). Particle fields missing from the
main file are taken from a passthrough file (matched by ``uid``).

Conversion follows pyem's ``csparc2star`` (asarnow/pyem, ``pyem/metadata/cryosparc2.py`` and
``pyem/geom/convert.py``), the established converter:

* Angles: pyem computes ``rot2euler(expmap(pose))`` where its ``expmap`` builds the *transposed*
  Rodrigues matrix (skew matrix ``[[0, w2, -w1], [-w2, 0, w0], [w1, -w0, 0]]``) and ``rot2euler``
  is RELION's ``Euler_matrix2angles``. So RELION's matrix is ``A = R(pose)ᵀ`` with ``R`` the usual
  right-handed Rodrigues rotation (cryoDRGN's ``parse_pose_csparc`` transposes the same way).
  Example: pose ``(0, 0, θ)`` → (rot, tilt, psi) = (0, 0, θ); pose ``(0, θ, 0)`` → (0, θ, 0).
* Shifts: pyem maps ``alignments3D/shift`` straight onto ``rlnOriginX/Y`` in pixels, no sign change.
  Here they become ``rlnOriginXAngst/YAngst`` by multiplying with ``alignments3D/psize_A`` (the
  pixel the alignment was done at; ``blob/psize_A`` when absent).
* Defocus angle and phase shift: radians → degrees. Voltage, Cs and amplitude contrast form the
  optics groups together with ``blob/psize_A`` and ``blob/shape``.
* Image names: ``f"{idx + 1:06d}@{path}"`` with the ``>`` stripped; paths stay relative to the
  cryoSPARC project folder (pass that folder as the image base directory).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.geometry import matrix_to_euler, rotvec_to_matrix
from ..errors import DeepAlignError
from .star import ANGLE_COLUMNS, ORIGIN_ANG_COLUMNS, ParticleTable

_OPTICS_FIELDS = {
    "ctf/accel_kv": "rlnVoltage",
    "ctf/cs_mm": "rlnSphericalAberration",
    "ctf/amp_contrast": "rlnAmplitudeContrast",
}
UID_COLUMN = "rlnCryosparcUid"
"""The particle's cryoSPARC uid, kept so results can be matched back (RELION keeps unknown labels)."""


def _load(path: Path) -> np.ndarray:
    if not path.exists():
        raise DeepAlignError(f"{path}: file not found")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DeepAlignError(f"{path}: not a cryoSPARC .cs file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if not isinstance(data, np.ndarray) or data.dtype.names is None:
        raise DeepAlignError(f"{path}: not a cryoSPARC .cs file (expected a numpy record array)")
    if data.ndim != 1 or len(data) == 0:
        raise DeepAlignError(f"{path}: no particles")
    return data


def _merge_passthrough(data: np.ndarray, path: Path, passthrough: Path) -> dict[str, np.ndarray]:
    """Fields of `data`, plus the fields only `passthrough` has, aligned by uid (or row order)."""
    fields = {name: data[name] for name in data.dtype.names}
    extra = _load(passthrough)
    new = [n for n in extra.dtype.names if n not in fields]
    if not new:
        return fields
    if "uid" in fields and "uid" in extra.dtype.names:
        order = pd.Index(extra["uid"]).get_indexer(data["uid"])
        if np.any(order < 0):
            missing = data["uid"][order < 0][0]
            raise DeepAlignError(f"{passthrough}: particle uid {missing} of {path.name} is missing")
    elif len(extra) == len(data):
        order = np.arange(len(data))
    else:
        raise DeepAlignError(f"{passthrough}: {len(extra)} rows and no uid field; cannot match the {len(data)} particles of {path.name}")
    for name in new:
        fields[name] = extra[name][order]
    return fields


def _text(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_cs(path: Path | str, passthrough: Path | str | None = None) -> ParticleTable:
    """Read a cryoSPARC particle `.cs` (optionally with its passthrough file) as a RELION 3.1 table."""
    path = Path(path)
    data = _load(path)
    fields = _merge_passthrough(data, path, Path(passthrough)) if passthrough is not None else {n: data[n] for n in data.dtype.names}
    n = len(data)
    for need in ("blob/path", "blob/idx"):
        if need not in fields:
            hint = "" if passthrough is not None else "; pass the passthrough .cs that has them"
            raise DeepAlignError(f"{path}: no {need} field{hint}")
    if "blob/psize_A" not in fields:
        raise DeepAlignError(f"{path}: no blob/psize_A field (pixel size)")

    stacks = [p.lstrip(">") for p in _text(fields["blob/path"])]
    idx = np.asarray(fields["blob/idx"], dtype=np.int64)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{s}" for i, s in zip(idx, stacks)]})

    if "alignments3D/pose" in fields:
        pose = np.asarray(fields["alignments3D/pose"], dtype=float).reshape(n, 3)
        eulers = matrix_to_euler(np.swapaxes(rotvec_to_matrix(pose), -1, -2))
        for j, col in enumerate(ANGLE_COLUMNS):
            df[col] = eulers[:, j]
    if "alignments3D/shift" in fields:
        shift_px = np.asarray(fields["alignments3D/shift"], dtype=float).reshape(n, 2)
        psize = fields.get("alignments3D/psize_A", fields["blob/psize_A"])
        shift_ang = shift_px * np.asarray(psize, dtype=float).reshape(n, 1)
        for j, col in enumerate(ORIGIN_ANG_COLUMNS):
            df[col] = shift_ang[:, j]

    if "ctf/df1_A" in fields:
        df["rlnDefocusU"] = np.asarray(fields["ctf/df1_A"], dtype=float)
        df["rlnDefocusV"] = np.asarray(fields.get("ctf/df2_A", fields["ctf/df1_A"]), dtype=float)
        df["rlnDefocusAngle"] = np.rad2deg(np.asarray(fields.get("ctf/df_angle_rad", np.zeros(n)), dtype=float))
        if "ctf/phase_shift_rad" in fields:
            df["rlnCtfPhaseShift"] = np.rad2deg(np.asarray(fields["ctf/phase_shift_rad"], dtype=float))
        missing = [f for f in _OPTICS_FIELDS if f not in fields]
        if missing:
            raise DeepAlignError(f"{path}: ctf/df1_A is given but {missing[0]} is missing")

    keys = pd.DataFrame({"rlnImagePixelSize": np.asarray(fields["blob/psize_A"], dtype=float)})
    for field, col in _OPTICS_FIELDS.items():
        if field in fields:
            keys[col] = np.asarray(fields[field], dtype=float)
    if "blob/shape" in fields:
        keys["rlnImageSize"] = np.asarray(fields["blob/shape"]).reshape(n, -1)[:, 0].astype(int)
    optics = keys.drop_duplicates().reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    optics["rlnImageDimensionality"] = 2
    df["rlnOpticsGroup"] = keys.merge(optics, on=list(keys.columns), how="left")["rlnOpticsGroup"].to_numpy().astype(int)
    if "uid" in fields:
        df[UID_COLUMN] = np.asarray(fields["uid"]).astype(np.uint64).astype(str)
    return ParticleTable(df, optics, path)
