"""RELION particle STAR files (3.0 and 3.1+) ⇄ `ParticleTable`.

Inside deepalign a particle table always uses RELION 3.1 names: ``rlnImageName`` (``index@stack``,
1-based), ``rlnAngleRot/Tilt/Psi`` (degrees), ``rlnOriginXAngst/YAngst`` (Å), ``rlnDefocusU/V``
(Å), ``rlnDefocusAngle`` (degrees), and per optics group ``rlnImagePixelSize`` (Å),
``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm), ``rlnAmplitudeContrast``, ``rlnImageSize`` (px).

Reading:
* 3.1+ files (``data_optics`` + ``data_particles``) are taken as they are; pixel origins
  (``rlnOriginX/Y``, as in the ASPIRE oracle ``rln_proj_64_shifted.star``) become Å with the optics
  group's pixel size.
* 3.0 files (one data block, no optics) get optics groups built from the per-particle pixel size
  (``rlnImagePixelSize``, or ``rlnDetectorPixelSize`` [µm] × 10⁴ / ``rlnMagnification``), voltage,
  Cs and amplitude contrast, as RELION 3.1 does when it upgrades a 3.0 file. Without a pixel size
  the table keeps ``optics=None`` and any pixel origins; `with_pixel_size` (the ``--angpix`` flag)
  completes it later.
* Unknown columns are kept unchanged and written back.

Writing (`write_particles`) always produces RELION 3.1 (``data_optics`` first, ``# version 30001``
before each block) that ``relion_reconstruct`` reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import starfile

from ..errors import DeepAlignError
from .atomic import atomic_write

ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_ANG_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst")
ORIGIN_PX_COLUMNS = ("rlnOriginX", "rlnOriginY")
OPTICS_COLUMNS_FROM_PARTICLES = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
RELION_30_PIXEL_COLUMNS = ("rlnDetectorPixelSize", "rlnMagnification", "rlnImagePixelSize")
MICRONS_TO_ANG = 1.0e4

DEFAULT_VOLTAGE_KV = 300.0
DEFAULT_CS_MM = 2.7
DEFAULT_AMPLITUDE_CONTRAST = 0.1
STAR_VERSION_LINE = "# version 30001"

CTF_KEYS = ("defocus_u_ang", "defocus_v_ang", "defocus_angle_deg", "voltage_kv", "cs_mm", "amplitude_contrast")
_CTF_PARTICLE_COLUMNS = {"defocus_u_ang": "rlnDefocusU", "defocus_v_ang": "rlnDefocusV", "defocus_angle_deg": "rlnDefocusAngle"}
_CTF_OPTICS_COLUMNS = {"voltage_kv": "rlnVoltage", "cs_mm": "rlnSphericalAberration", "amplitude_contrast": "rlnAmplitudeContrast"}


@dataclasses.dataclass
class ParticleTable:
    """particles: one row per particle (RELION 3.1 names); optics: one row per optics group, or
    None when the pixel size is unknown; source: the file it came from (for error messages and for
    resolving relative image paths)."""

    particles: pd.DataFrame
    optics: pd.DataFrame | None
    source: Path

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def name(self) -> str:
        return str(self.source)

    def copy(self) -> "ParticleTable":
        return ParticleTable(self.particles.copy(), None if self.optics is None else self.optics.copy(), self.source)

    # Thin method forms of the module functions below (same behaviour, same errors).
    def pixel_sizes(self) -> np.ndarray:
        return pixel_sizes(self)

    def get_poses(self) -> tuple[np.ndarray, np.ndarray]:
        return get_poses(self)

    def set_poses(self, eulers_deg: np.ndarray, origins_ang: np.ndarray | None = None) -> "ParticleTable":
        return set_poses(self, eulers_deg, origins_ang)

    def get_ctf_params(self) -> dict[str, np.ndarray] | None:
        return get_ctf_params(self)

    def image_names(self) -> list[str]:
        return image_names(self)


# ----------------------------------------------------------------------------------------- reading


def _read_blocks(path: Path) -> dict:
    if not path.exists():
        raise DeepAlignError(f"{path}: file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # starfile raises assorted parser errors on malformed text
        raise DeepAlignError(f"{path}: not a readable STAR file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return blocks


def _as_frame(block) -> pd.DataFrame | None:
    if isinstance(block, pd.DataFrame):
        return block.reset_index(drop=True)
    if isinstance(block, dict) and block:  # single-row key/value block
        return pd.DataFrame({k: [v] for k, v in block.items()})
    return None


def read_particles(path: Path | str) -> ParticleTable:
    """Read a RELION 3.0 or 3.1+ particle STAR file (see the module docstring)."""
    path = Path(path)
    blocks = _read_blocks(path)
    optics = _as_frame(blocks["optics"]) if "optics" in blocks else None
    if "particles" in blocks:
        particles = _as_frame(blocks["particles"])
    else:
        frames = [(k, _as_frame(v)) for k, v in blocks.items() if k != "optics"]
        frames = [(k, f) for k, f in frames if f is not None and len(f.columns)]
        if not frames:
            raise DeepAlignError(f"{path}: no data_particles loop (and no other data block) found")
        particles = max(frames, key=lambda kf: len(kf[1]))[1]
    if particles is None or len(particles) == 0:
        raise DeepAlignError(f"{path}: the particle table is empty")
    table = ParticleTable(particles, optics, path)
    if optics is None:
        table = _upgrade_relion30(table)
    if table.optics is not None:
        if "rlnOpticsGroup" not in table.particles and len(table.optics) == 1:
            table.particles["rlnOpticsGroup"] = int(table.optics["rlnOpticsGroup"].iloc[0])
        if "rlnOpticsGroup" not in table.particles:
            raise DeepAlignError(f"{path}: several optics groups but no rlnOpticsGroup column in data_particles")
        table = _origins_to_angstrom(table)
    return table


def _relion30_pixel(df: pd.DataFrame) -> np.ndarray | None:
    if "rlnImagePixelSize" in df:
        return df["rlnImagePixelSize"].to_numpy(float)
    if "rlnDetectorPixelSize" in df and "rlnMagnification" in df:
        return df["rlnDetectorPixelSize"].to_numpy(float) * MICRONS_TO_ANG / df["rlnMagnification"].to_numpy(float)
    return None


def _upgrade_relion30(table: ParticleTable) -> ParticleTable:
    """RELION 3.0 table → optics groups from unique (pixel, voltage, Cs, Q0); None when no pixel."""
    df = table.particles
    pixel = _relion30_pixel(df)
    if pixel is None:
        return table
    keys = pd.DataFrame({"rlnImagePixelSize": pixel})
    for col in OPTICS_COLUMNS_FROM_PARTICLES:
        if col in df:
            keys[col] = df[col].to_numpy(float)
    groups = keys.drop_duplicates().reset_index(drop=True)
    groups.insert(0, "rlnOpticsGroup", np.arange(1, len(groups) + 1))
    groups.insert(1, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in groups["rlnOpticsGroup"]])
    groups["rlnImageDimensionality"] = 2
    group_of = keys.merge(groups, on=list(keys.columns), how="left")["rlnOpticsGroup"].to_numpy()
    particles = df.drop(columns=[c for c in (*RELION_30_PIXEL_COLUMNS, *OPTICS_COLUMNS_FROM_PARTICLES) if c in df])
    particles["rlnOpticsGroup"] = group_of.astype(int)
    return ParticleTable(particles, groups, table.source)


def _origins_to_angstrom(table: ParticleTable) -> ParticleTable:
    """Pixel origins → Å with the optics pixel size; when both exist the Å columns win."""
    df = table.particles
    if not any(c in df for c in ORIGIN_PX_COLUMNS):
        return table
    if not all(c in df for c in ORIGIN_ANG_COLUMNS):
        pixel = pixel_sizes(table)
        at = min(df.columns.get_loc(c) for c in ORIGIN_PX_COLUMNS if c in df)
        for j, (px_col, ang_col) in enumerate(zip(ORIGIN_PX_COLUMNS, ORIGIN_ANG_COLUMNS)):
            values = df[px_col].to_numpy(float) if px_col in df else np.zeros(len(df))
            if ang_col in df:
                df = df.drop(columns=[ang_col])
            df.insert(at + j, ang_col, values * pixel)
    table.particles = df.drop(columns=[c for c in ORIGIN_PX_COLUMNS if c in df])
    return table


def with_pixel_size(table: ParticleTable, pixel_size_ang: float) -> ParticleTable:
    """Copy with every particle's pixel size set to pixel_size_ang (the ``--angpix`` override).

    Creates one optics group when there is none (voltage, Cs, Q0 taken from the particle columns
    when present, else RELION's usual 300 kV / 2.7 mm / 0.1) and converts pixel origins to Å.
    """
    if not pixel_size_ang or pixel_size_ang <= 0:
        raise DeepAlignError(f"{table.name}: pixel size must be positive, got {pixel_size_ang}")
    out = table.copy()
    if out.optics is None:
        df = out.particles
        row = {"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1", "rlnImagePixelSize": float(pixel_size_ang)}
        defaults = (DEFAULT_VOLTAGE_KV, DEFAULT_CS_MM, DEFAULT_AMPLITUDE_CONTRAST)
        for col, default in zip(OPTICS_COLUMNS_FROM_PARTICLES, defaults):
            row[col] = float(df[col].iloc[0]) if col in df else default
        row["rlnImageDimensionality"] = 2
        out.optics = pd.DataFrame([row])
        out.particles = df.drop(columns=[c for c in (*RELION_30_PIXEL_COLUMNS, *OPTICS_COLUMNS_FROM_PARTICLES) if c in df])
        out.particles["rlnOpticsGroup"] = 1
    else:
        out.optics["rlnImagePixelSize"] = float(pixel_size_ang)
        out.particles = out.particles.drop(columns=[c for c in RELION_30_PIXEL_COLUMNS if c in out.particles])
    return _origins_to_angstrom(out)


# ------------------------------------------------------------------------------------ per-particle


def _optics_column(table: ParticleTable, col: str) -> np.ndarray | None:
    """Per-particle values (n,) of `col`, from the particle table or through rlnOpticsGroup."""
    df = table.particles
    if col in df:
        return df[col].to_numpy()
    if table.optics is None or col not in table.optics:
        return None
    lookup = dict(zip(table.optics["rlnOpticsGroup"].astype(int), table.optics[col]))
    groups = df["rlnOpticsGroup"].astype(int).to_numpy() if "rlnOpticsGroup" in df else np.ones(len(df), int)
    missing = sorted(set(np.unique(groups)) - set(lookup))
    if missing:
        raise DeepAlignError(f"{table.name}: rlnOpticsGroup {missing[0]} is not in data_optics")
    return np.array([lookup[g] for g in groups])


def pixel_sizes(table: ParticleTable) -> np.ndarray:
    """Pixel size (Å) of every particle (n,) float64, from its optics group."""
    pixel = _optics_column(table, "rlnImagePixelSize")
    if pixel is None and table.optics is None:
        pixel = _relion30_pixel(table.particles)
    if pixel is None:
        raise DeepAlignError(f"{table.name}: no pixel size (rlnImagePixelSize in data_optics); pass --angpix")
    pixel = np.asarray(pixel, dtype=float)
    if not np.all(np.isfinite(pixel) & (pixel > 0)):
        raise DeepAlignError(f"{table.name}: pixel size (rlnImagePixelSize) must be positive")
    return pixel


def pixel_size(table: ParticleTable) -> float:
    """The single pixel size (Å) shared by all particles; error if the optics groups differ."""
    pixel = pixel_sizes(table)
    if not np.allclose(pixel, pixel[0], rtol=1e-4):
        raise DeepAlignError(f"{table.name}: optics groups have different pixel sizes ({pixel.min():g}–{pixel.max():g} Å); rescale the particles to one pixel size first")
    return float(pixel[0])


def box_size(table: ParticleTable) -> int | None:
    """Image box (px) from rlnImageSize in data_optics, or None when not recorded."""
    size = _optics_column(table, "rlnImageSize")
    if size is None:
        return None
    size = np.asarray(size, dtype=int)
    if not np.all(size == size[0]):
        raise DeepAlignError(f"{table.name}: optics groups have different box sizes (rlnImageSize)")
    return int(size[0])


def image_names(table: ParticleTable) -> list[str]:
    """The rlnImageName of every particle (``index@stack``, 1-based)."""
    if "rlnImageName" not in table.particles:
        raise DeepAlignError(f"{table.name}: no rlnImageName column; the particles need images")
    return [str(x) for x in table.particles["rlnImageName"]]


def image_base_dir(table: ParticleTable) -> Path:
    """Folder the relative stack paths of rlnImageName are relative to.

    RELION resolves them against its project folder, which is usually the STAR file's folder or
    one of its parents (``Refine3D/job012/run_data.star`` → ``Extract/job004/…``). Returns the
    first of: the STAR folder, its parents (up to 3 levels), the current folder, where the first
    particle's stack exists; the STAR folder when none does.
    """
    from .mrc import parse_image_name

    star_dir = Path(table.source).resolve().parent
    names = image_names(table)
    _, stack = parse_image_name(names[0])
    if Path(stack).is_absolute():
        return star_dir
    candidates = [star_dir, *list(star_dir.parents)[:3], Path.cwd()]
    for base in candidates:
        if (base / stack).exists():
            return base
    return star_dir


def rebase_image_names(table: ParticleTable, new_folder: Path, root: Path, keep_inside: bool = False) -> ParticleTable:
    """A copy of the table whose rlnImageName stack paths find the same stacks from a STAR written
    in `new_folder`: stacks under `root` (the project) relative to new_folder, so the project
    can be moved as a whole (keep_inside: their names unchanged, as the input had them); stacks
    elsewhere absolute, so it can be moved without them. Indices keep their format; names already
    absolute stay as they are."""
    import os

    from .mrc import parse_image_name

    base, new_folder, root = image_base_dir(table), Path(new_folder).resolve(), Path(root).resolve()
    names = []
    for name in image_names(table):
        parse_image_name(name)  # the same check as every reader
        index, stack = str(name).split("@", 1)
        if Path(stack).is_absolute():
            names.append(name)
            continue
        path = (base / stack).resolve()
        inside = path == root or root in path.parents
        if inside and keep_inside:
            names.append(name)
        else:
            names.append(f"{index}@{os.path.relpath(path, new_folder) if inside else path}")
    out = table.copy()
    out.particles["rlnImageName"] = names
    return out


def get_poses(table: ParticleTable, hint: str = "the particles need poses (a refined or pre-aligned STAR file)") -> tuple[np.ndarray, np.ndarray]:
    """(eulers_deg (n, 3) [rot, tilt, psi], origins_ang (n, 2) [x, y]) float64; origins default 0."""
    df = table.particles
    for col in ANGLE_COLUMNS:
        if col not in df:
            raise DeepAlignError(f"{table.name}: no {col} column; {hint}")
    eulers = df[list(ANGLE_COLUMNS)].to_numpy(float)
    if all(c in df for c in ORIGIN_ANG_COLUMNS):
        origins = df[list(ORIGIN_ANG_COLUMNS)].to_numpy(float)
    elif any(c in df and np.any(df[c].to_numpy(float) != 0) for c in ORIGIN_PX_COLUMNS):
        raise DeepAlignError(f"{table.name}: origins are in pixels (rlnOriginX/Y) and the pixel size is unknown; pass --angpix")
    else:
        origins = np.zeros((len(df), 2))
    if not (np.all(np.isfinite(eulers)) and np.all(np.isfinite(origins))):
        raise DeepAlignError(f"{table.name}: angles or origins contain NaN or infinite values")
    return eulers, origins


def set_poses(table: ParticleTable, eulers_deg: np.ndarray, origins_ang: np.ndarray | None = None) -> ParticleTable:
    """Copy of the table with new angles (n, 3) degrees and origins (n, 2) Å (None → 0)."""
    out = table.copy()
    n = len(out)
    eulers = np.asarray(eulers_deg, dtype=float)
    origins = np.zeros((n, 2)) if origins_ang is None else np.asarray(origins_ang, dtype=float)
    if eulers.shape != (n, 3) or origins.shape != (n, 2):
        raise ValueError(f"set_poses: expected eulers ({n}, 3) and origins ({n}, 2), got {eulers.shape} and {origins.shape}")
    df = out.particles.drop(columns=[c for c in ORIGIN_PX_COLUMNS if c in out.particles])
    for j, col in enumerate(ANGLE_COLUMNS):
        df[col] = eulers[:, j]
    for j, col in enumerate(ORIGIN_ANG_COLUMNS):
        df[col] = origins[:, j]
    out.particles = df
    return out


def get_ctf_params(table: ParticleTable) -> dict[str, np.ndarray] | None:
    """CTF parameters per particle, each (n,) float64, or None when there is no rlnDefocusU.

    Keys: defocus_u_ang, defocus_v_ang (default U), defocus_angle_deg (default 0), voltage_kv,
    cs_mm, amplitude_contrast (from the particle or the optics table).
    """
    df = table.particles
    if "rlnDefocusU" not in df:
        return None
    n = len(df)
    du = df["rlnDefocusU"].to_numpy(float)
    out = {
        "defocus_u_ang": du,
        "defocus_v_ang": df["rlnDefocusV"].to_numpy(float) if "rlnDefocusV" in df else du.copy(),
        "defocus_angle_deg": df["rlnDefocusAngle"].to_numpy(float) if "rlnDefocusAngle" in df else np.zeros(n),
    }
    for key, col in _CTF_OPTICS_COLUMNS.items():
        values = _optics_column(table, col)
        if values is None:
            raise DeepAlignError(f"{table.name}: rlnDefocusU is given but {col} is missing (data_optics)")
        out[key] = np.asarray(values, dtype=float)
    return out


# ----------------------------------------------------------------------------------------- writing


def _broadcast(value, n: int, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{what}: expected a scalar or ({n},), got {arr.shape}")
    return arr


def _uniform(value, what: str) -> float:
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if not np.allclose(arr, arr[0]):
        raise ValueError(f"{what} must be the same for all particles (one optics group)")
    return float(arr[0])


def make_table(
    image_names: Sequence[str],
    eulers_deg: np.ndarray | None,
    origins_ang: np.ndarray | None,
    pixel_size_ang: float,
    box: int,
    ctf: Mapping[str, np.ndarray | float] | None = None,
    extra_columns: Mapping[str, Sequence] | None = None,
    source: Path | str = Path("particles.star"),
) -> ParticleTable:
    """A fresh RELION 3.1 table with one optics group.

    image_names: n ``index@stack`` names. eulers_deg (n, 3) or None (unaligned particles);
    origins_ang (n, 2) Å or None (→ 0 when eulers are given). ctf: dict with the `CTF_KEYS`
    (defocus (n,) Å, angle (n,) degrees, voltage/Cs/Q0 scalars or uniform arrays); None → no
    defocus columns and RELION's default optics (300 kV, 2.7 mm, 0.1). extra_columns: name → (n,).
    """
    names = [str(x) for x in image_names]
    n = len(names)
    df = pd.DataFrame({"rlnImageName": names})
    if eulers_deg is not None:
        eulers = np.asarray(eulers_deg, dtype=float).reshape(n, 3)
        origins = np.zeros((n, 2)) if origins_ang is None else np.asarray(origins_ang, dtype=float).reshape(n, 2)
        for j, col in enumerate(ANGLE_COLUMNS):
            df[col] = eulers[:, j]
        for j, col in enumerate(ORIGIN_ANG_COLUMNS):
            df[col] = origins[:, j]
    voltage, cs, q0 = DEFAULT_VOLTAGE_KV, DEFAULT_CS_MM, DEFAULT_AMPLITUDE_CONTRAST
    if ctf is not None:
        for key, col in _CTF_PARTICLE_COLUMNS.items():
            df[col] = _broadcast(ctf[key], n, key)
        voltage = _uniform(ctf["voltage_kv"], "voltage_kv")
        cs = _uniform(ctf["cs_mm"], "cs_mm")
        q0 = _uniform(ctf["amplitude_contrast"], "amplitude_contrast")
    df["rlnOpticsGroup"] = 1
    for key, values in (extra_columns or {}).items():
        values = np.asarray(values)
        if values.shape[:1] != (n,):
            raise ValueError(f"extra column {key}: expected {n} values, got {values.shape}")
        df[key] = values
    optics = pd.DataFrame(
        [
            {
                "rlnOpticsGroup": 1,
                "rlnOpticsGroupName": "opticsGroup1",
                "rlnVoltage": voltage,
                "rlnSphericalAberration": cs,
                "rlnAmplitudeContrast": q0,
                "rlnImagePixelSize": float(pixel_size_ang),
                "rlnImageSize": int(box),
                "rlnImageDimensionality": 2,
            }
        ]
    )
    return ParticleTable(df, optics, Path(source))


def _complete_optics(table: ParticleTable, pixel_size_ang, box, voltage_kv, cs_mm, amplitude_contrast, path: Path) -> ParticleTable:
    """Optics table RELION 3.1 accepts: pixel size, voltage, Cs, Q0, image size, dimensionality."""
    out = table.copy()
    if out.optics is None:
        pixel = pixel_size_ang
        if pixel is None:
            p30 = _relion30_pixel(out.particles)
            if p30 is None:
                raise DeepAlignError(f"{table.name}: no pixel size (rlnImagePixelSize in data_optics); pass --angpix")
            pixel = _uniform(p30, "pixel size")
        out = with_pixel_size(out, pixel)
    elif pixel_size_ang is not None:
        out.optics["rlnImagePixelSize"] = float(pixel_size_ang)
    optics = out.optics
    for col, value in zip(OPTICS_COLUMNS_FROM_PARTICLES, (voltage_kv, cs_mm, amplitude_contrast)):
        if col not in optics:
            optics[col] = float(value)
    if "rlnOpticsGroupName" not in optics:
        optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    if "rlnImageDimensionality" not in optics:
        optics["rlnImageDimensionality"] = 2
    if box is not None:
        optics["rlnImageSize"] = int(box)
    elif "rlnImageSize" not in optics:
        optics["rlnImageSize"] = _box_from_images(out, path)
    if "rlnOpticsGroup" not in out.particles:
        out.particles["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    optics["rlnOpticsGroup"] = optics["rlnOpticsGroup"].astype(int)
    optics["rlnImageSize"] = optics["rlnImageSize"].astype(int)
    optics["rlnImageDimensionality"] = optics["rlnImageDimensionality"].astype(int)
    out.particles["rlnOpticsGroup"] = out.particles["rlnOpticsGroup"].astype(int)
    return out


def _box_from_images(table: ParticleTable, path: Path) -> int:
    from .mrc import parse_image_name, stack_info

    if "rlnImageName" in table.particles:
        base = image_base_dir(table)
        _, stack = parse_image_name(str(table.particles["rlnImageName"].iloc[0]))
        stack_path = Path(stack) if Path(stack).is_absolute() else base / stack
        if stack_path.exists():
            return stack_info(stack_path)[1]
    raise DeepAlignError(f"{path}: cannot write data_optics without the box size (rlnImageSize); the first particle's stack was not found")


def write_particles(
    path: Path | str,
    table: ParticleTable,
    *,
    pixel_size_ang: float | None = None,
    box: int | None = None,
    voltage_kv: float = DEFAULT_VOLTAGE_KV,
    cs_mm: float = DEFAULT_CS_MM,
    amplitude_contrast: float = DEFAULT_AMPLITUDE_CONTRAST,
) -> None:
    """Write a RELION 3.1 particle STAR (data_optics, then data_particles), atomically.

    When the table has no optics, one group is synthesised from pixel_size_ang (or the 3.0
    pixel columns) and the given voltage (kV), Cs (mm) and amplitude contrast; box (px) fills
    rlnImageSize when the optics table lacks it (else it is read from the first stack's header).
    """
    path = Path(path)
    out = _complete_optics(table, pixel_size_ang, box, voltage_kv, cs_mm, amplitude_contrast, path)
    particles = out.particles.drop(columns=[c for c in ORIGIN_PX_COLUMNS if c in out.particles])
    with atomic_write(path) as tmp:
        starfile.write({"optics": out.optics, "particles": particles}, tmp)
        text = tmp.read_text()
        tmp.write_text(_with_version_lines(text))


def _with_version_lines(text: str) -> str:
    """Put RELION's ``# version 30001`` line before every data block (starfile does not)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("data_"):
            lines.extend([STAR_VERSION_LINE, ""])
        lines.append(line)
    return "\n".join(lines) + "\n"
