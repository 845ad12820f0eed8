"""Print the commands that reconstruct deepalign's poses in RELION, Xmipp or cryoSPARC.

    deepalign reconstruct-args demo                          # RELION (default)
    deepalign reconstruct-args demo --program all --sym C4
    deepalign reconstruct-args demo --star demo/consensus/consensus.star --program xmipp
    deepalign reconstruct-args demo --slurm --partition cpu --gres gpu:1
    bash demo/reconstruct.sh                                 # or: sbatch demo/reconstruct.sh

The commands are printed and written to PROJECT/reconstruct.sh (bash, `set -e`, absolute paths;
it first changes to the folder the STAR's relative image names resolve from). The particles are
PROJECT/align/aligned.star unless --star is given (PROJECT/refine/refined.star when refine ran
without align); the symmetry is --sym, else the project's regions.symmetry.

* RELION: `relion_reconstruct --ctf --sym` for the full map and, with `--subset 1|2`, the two half
  maps, then `relion_image_handler --fsc` for their FSC. Half sets come from rlnRandomSubset; when
  the STAR has none, a copy with alternate subsets (1, 2, 1, …) is written as
  PROJECT/reconstruct_halves.star. The pixel size comes from the STAR's optics table; `--angpix`
  is added only when the STAR has none.
* RELION, last step: `mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves` that
  continues from deepalign's poses with local searches only: on PROJECT/refine/refined.star
  against refine/map.mrc from refine's resolution (--ini_high) when refine finished and --star is
  not given (or is that STAR), else on the particles above against the map just reconstructed,
  from 30 Å. The HEALPix order (also --auto_local_healpix_order) is the smallest whose sampling
  (60° / 2^order) is at most the angular step the poses came from (refine's last iteration, else
  align's summary.json, else 7.5°); --sigma_ang is twice that step. Output:
  Refine3D/deepalign_local/run* under the folder the image names resolve from. It takes hours, so
  the script runs it only when asked: `DEEPALIGN_RELION_REFINE=1 bash PROJECT/reconstruct.sh`. A
  particle STAR without a pixel size in data_optics is copied with it to
  PROJECT/reconstruct_local_refine.star (relion_refine reads it only from there).
* Xmipp: the particles are converted to PROJECT/reconstruct.xmd (+ _half1/_half2.xmd) by
  deepalign's writer, then `xmipp_reconstruct_fourier --useCTF --sampling` runs on each.
* cryoSPARC: the import route (Import Particle Stack → Homogeneous Reconstruction Only) as
  comments: which file, which folder, which fields.
* --slurm adds #SBATCH lines (job name, log, --partition, --gres) so the script can be sbatch'ed.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from ..core.symmetry import UnknownSymmetry, canonical_name
from ..errors import DeepAlignError
from ..io.atomic import write_text_atomic
from ..io.project import Project
from ..io.mrc import parse_image_name, stack_info
from ..io.star import (
    ParticleTable,
    box_size,
    get_poses,
    image_base_dir,
    image_names,
    pixel_size,
    read_particles,
    with_pixel_size,
    write_particles,
)

PROGRAMS = ("relion", "xmipp", "cryosparc", "all")
SCRIPT_NAME = "reconstruct.sh"
HALVES_STAR = "reconstruct_halves.star"
XMD_NAME = "reconstruct.xmd"
RELION_DIR = "reconstruct_relion"
XMIPP_DIR = "reconstruct_xmipp"
XMIPP_NYQUIST = 0.5  # xmipp_reconstruct_fourier --max_resolution is a digital frequency; 0.5 = Nyquist
XMIPP_PADDING = (2, 2)  # projection and volume padding factors (Xmipp's defaults)
SLURM_JOB_NAME = "deepalign-reconstruct"
REFINED_STAR = "refine/refined.star"  # deepalign refine's particles, and its map
REFINED_MAP = "refine/map.mrc"
LOCAL_REFINE_OUT = "Refine3D/deepalign_local/run"  # relion_refine --o, under the folder the image names resolve from
LOCAL_REFINE_STAR = "reconstruct_local_refine.star"  # the particles with their pixel size in data_optics, when they lack it
RELION_REFINE_RANKS = 3  # --split_random_halves under MPI: a leader plus one follower per half set
HEALPIX_ORDER0_DEG = 60.0  # RELION's angular sampling at HEALPix order k: 60° / 2^k (2 → 15°, 3 → 7.5°, 4 → 3.75°, …)
DEFAULT_STEP_DEG = 7.5  # the poses' angular step when no summary.json records it
DEFAULT_INI_HIGH_ANG = 30.0  # relion_refine --ini_high when the resolution of the poses is unknown
SIGMA_ANG_STEPS = 2.0  # --sigma_ang in angular steps (RELION searches ± 3 sigma around each pose)
OFFSET_RANGE_PX, OFFSET_STEP_PX = 3, 1
LOCAL_REFINE_SWITCH = "DEEPALIGN_RELION_REFINE"  # the script runs relion_refine only when this variable is 1


def _q(path) -> str:
    return shlex.quote(str(path))


def _relion_section(table: ParticleTable, star: Path, sym: str, root: Path, angpix: float | None) -> tuple[list[str], ParticleTable | None]:
    """RELION lines; plus the halves table to write when the STAR lacks rlnRandomSubset."""
    df = table.particles
    halves = None
    subsets = set(np.unique(df["rlnRandomSubset"].to_numpy())) if "rlnRandomSubset" in df else set()
    if not {1, 2} <= {int(s) for s in subsets}:
        halves = table.copy()
        halves.particles["rlnRandomSubset"] = 1 + np.arange(len(df)) % 2
        star = root / HALVES_STAR
    out = root / RELION_DIR
    common = ["--i", _q(star), "--sym", sym]
    if "rlnDefocusU" in df:
        common.append("--ctf")
    if angpix is not None:
        common += ["--angpix", f"{angpix:g}"]
    pixel = angpix if angpix is not None else pixel_size(table)
    lines = [
        "# ---- RELION: full map, two half maps, FSC between the halves",
        f"# particles: {star}" + (" (copy of the input with alternate rlnRandomSubset 1/2)" if halves is not None else ""),
        f"mkdir -p {_q(out)}",
        " ".join(["relion_reconstruct", *common, "--o", _q(out / "map.mrc")]),
        " ".join(["relion_reconstruct", *common, "--subset", "1", "--o", _q(out / "half1.mrc")]),
        " ".join(["relion_reconstruct", *common, "--subset", "2", "--o", _q(out / "half2.mrc")]),
        "# FSC of the half maps as a STAR table (rlnAngstromResolution, rlnFourierShellCorrelation);",
        "# the resolution is where the FSC falls below 0.143",
        f"relion_image_handler --i {_q(out / 'half1.mrc')} --fsc {_q(out / 'half2.mrc')} --angpix {pixel:g} > {_q(out / 'fsc.star')}",
    ]
    if "rlnDefocusU" not in df:
        lines.insert(2, "# no rlnDefocusU in the STAR: reconstructing without CTF correction")
    return lines, halves


def healpix_order(step_deg: float) -> int:
    """Smallest HEALPix order whose RELION angular sampling (60° / 2^order) is at most step_deg."""
    if not (np.isfinite(step_deg) and step_deg > 0):
        raise DeepAlignError(f"angular step {step_deg}: must be a positive number of degrees")
    order = 0
    while HEALPIX_ORDER0_DEG / 2**order > step_deg * (1 + 1e-6):
        order += 1
    return order


@dataclass
class LocalRefine:
    """What relion_refine continues from (see the module docstring)."""

    star: Path  # --i
    table: ParticleTable
    ref: Path  # --ref
    ini_high_ang: float
    step_deg: float
    step_from: str  # where step_deg was read
    base: Path  # the folder the particles' image names resolve from
    pixel: float
    box: int
    copy: ParticleTable | None = None  # to write to `star` (the particles lack a pixel size in data_optics)


def _summary(path: Path) -> dict:
    """A stage's summary.json ({} when missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _positive(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value > 0 else None


def _poses_step(root: Path, star: Path, refined: bool) -> tuple[float, str]:
    """(the angular step the poses came from, where it was read): refine's last iteration for the
    refined STAR, else the summary.json beside a STAR of the project (align_exhaustive/…) or align's, else 7.5°."""
    if refined:
        summary = root / "refine" / "summary.json"
        steps = [_positive(h.get("angular_step_deg")) for h in _summary(summary).get("history") or [] if isinstance(h, dict)]
        steps = [s for s in steps if s is not None]
        if steps:
            return steps[-1], f"refine's last iteration, {summary}"
    beside = [star.parent / "summary.json"] if root in star.parents and not refined else []
    for summary in [*beside, root / "align" / "summary.json"]:
        step = _positive(_summary(summary).get("angular_step_deg"))
        if step is not None:
            return step, str(summary)
    return DEFAULT_STEP_DEG, "no summary.json records it: default"


def _box_px(table: ParticleTable, base: Path, proj: Project, star: Path) -> int:
    """The particles' box: rlnImageSize, else the project's, else the first stack's header."""
    box = box_size(table) or proj.box_px
    if box is None:
        _, stack = parse_image_name(image_names(table)[0])
        path = Path(stack) if Path(stack).is_absolute() else base / stack
        if not path.is_file():
            raise DeepAlignError(f"{star}: no rlnImageSize in data_optics and {path} not found; cannot tell the particles' box")
        box = stack_info(path)[1]
    return int(box)


def _local_refine(proj: Project, star: Path, star_given: bool, table: ParticleTable, recon_map: Path, angpix: float | None) -> LocalRefine:
    """relion_refine's inputs: refine's STAR, map and resolution when refine finished and --star is not
    given (or names that STAR), else the particles being reconstructed and their map, from 30 Å."""
    root = proj.root
    refined_star = (root / REFINED_STAR).resolve()
    refined = star == refined_star or (not star_given and proj.is_done("refine") and refined_star.is_file())
    if refined:
        if star != refined_star:
            star, table = refined_star, read_particles(refined_star)
        ref = root / REFINED_MAP if (root / REFINED_MAP).is_file() else recon_map
        resolution = _positive(_summary(root / "refine" / "summary.json").get("resolution_ang")) or _positive(proj.stage("refine").get("resolution_ang"))
        ini_high = resolution or DEFAULT_INI_HIGH_ANG
    else:
        ref, ini_high = recon_map, DEFAULT_INI_HIGH_ANG
    step, step_from = _poses_step(root, star, refined)
    base = image_base_dir(table)
    box = _box_px(table, base, proj, star)
    copy, star_in = None, star
    if table.optics is None or "rlnImagePixelSize" not in table.optics:  # relion_refine reads the pixel size only from data_optics
        angpix = angpix if angpix is not None else proj.pixel_size_ang
        if angpix is None:
            raise DeepAlignError(f"{star}: no pixel size in data_optics and none recorded in {proj.yaml_path}; relion_refine needs one")
        copy, star_in = with_pixel_size(table, angpix), root / LOCAL_REFINE_STAR
    pixel = pixel_size(copy if copy is not None else table)
    return LocalRefine(star_in, table, ref, ini_high, step, step_from, base, pixel, box, copy)


def _local_refine_lines(li: LocalRefine, sym: str, base: Path) -> list[str]:
    """relion_refine_mpi that continues gold-standard refinement from the poses, with local searches only."""
    order = healpix_order(li.step_deg)
    sigma = SIGMA_ANG_STEPS * li.step_deg
    diameter = np.floor(li.box * li.pixel * 10) / 10  # the whole box (Å), never past it
    options = ["--auto_refine", "--split_random_halves", "--i", _q(li.star), "--ref", _q(li.ref), "--ini_high", f"{li.ini_high_ang:g}",
               "--healpix_order", str(order), "--auto_local_healpix_order", str(order), "--sigma_ang", f"{sigma:.4g}",
               "--offset_range", str(OFFSET_RANGE_PX), "--offset_step", str(OFFSET_STEP_PX), "--sym", sym, "--particle_diameter", f"{diameter:g}"]
    if "rlnDefocusU" in li.table.particles:
        options.append("--ctf")
    options += ["--flatten_solvent", "--zero_mask", "--pad", "2", "--o", LOCAL_REFINE_OUT]
    moved = li.base != base
    lines = [
        f"# ---- RELION, last step (optional, hours rather than seconds): runs only as {LOCAL_REFINE_SWITCH}=1 bash {SCRIPT_NAME}"
        f" (under SLURM: sbatch --ntasks={RELION_REFINE_RANKS})",
        f"# particles: {li.star}" + (" (copy with the pixel size in data_optics)" if li.copy is not None else "") + f"; reference: {li.ref}",
        f"# the poses come from a {li.step_deg:.4g}° angular step ({li.step_from}) → HEALPix order {order} "
        f"({HEALPIX_ORDER0_DEG / 2**order:g}°) and --sigma_ang {sigma:.4g}° (RELION searches ± 3 sigma)",
        f'if [[ "${{{LOCAL_REFINE_SWITCH}:-0}}" == 1 ]]; then',
        *([f"  cd {_q(li.base)}"] if moved else []),
        f"  mkdir -p {Path(LOCAL_REFINE_OUT).parent}",
        "  # RELION's gold-standard auto-refine continued from deepalign's poses: local searches around them from the first iteration",
        "  " + " ".join(["mpirun", "-n", str(RELION_REFINE_RANKS), "relion_refine_mpi", *options]),
        *([f"  cd {_q(base)}"] if moved else []),
        "fi",
    ]
    if "rlnDefocusU" not in li.table.particles:
        lines.insert(3, "# no rlnDefocusU in the STAR: refining without CTF correction")
    return lines


def _absolute_names(table: ParticleTable, base: Path) -> ParticleTable:
    """Copy with every relative stack path of rlnImageName made absolute (from `base`)."""
    out = table.copy()

    def absolute(name: str) -> str:
        index, _, stack = str(name).partition("@")
        return f"{index}@{base / stack}" if stack and not Path(stack).is_absolute() else str(name)

    out.particles["rlnImageName"] = [absolute(n) for n in table.particles["rlnImageName"]]
    return out


def _xmipp_section(table: ParticleTable, base: Path, sym: str, root: Path, angpix: float | None) -> tuple[list[str], dict[Path, ParticleTable]]:
    """Xmipp lines and the .xmd files (full, half1, half2; absolute image paths) to write."""
    xmd = root / XMD_NAME
    table = _absolute_names(table if angpix is None else with_pixel_size(table, angpix), base)
    files = {xmd: table}
    for half in (1, 2):
        sub = table.copy()
        sub.particles = table.particles.iloc[half - 1 :: 2].reset_index(drop=True)
        files[xmd.with_name(f"{xmd.stem}_half{half}.xmd")] = sub
    out = root / XMIPP_DIR
    pixel = angpix if angpix is not None else pixel_size(table)
    options = ["--sym", sym.lower(), "--max_resolution", f"{XMIPP_NYQUIST:g}", "--padding", *map(str, XMIPP_PADDING)]
    if "rlnDefocusU" in table.particles:
        options += ["--useCTF", "--sampling", f"{pixel:g}"]
    lines = ["# ---- Xmipp: the same particles converted to .xmd by deepalign (shifts in px, same angles)", f"mkdir -p {_q(out)}"]
    for path, name in zip(files, ("map", "half1", "half2")):
        lines.append(" ".join(["xmipp_reconstruct_fourier", "-i", _q(path), "-o", _q(out / f"{name}.vol"), *options]))
    return lines, files


def _cryosparc_section(table: ParticleTable, star: Path, base: Path, sym: str) -> list[str]:
    stacks = sorted({str(base / Path(str(n).split("@", 1)[-1]).parent) for n in table.particles["rlnImageName"]})
    optics = table.optics.iloc[0] if table.optics is not None else {}
    fields = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    fields += [c for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle") if c in table.particles]

    def opt(col, unit):
        return f"{optics[col]:g} {unit}" if col in optics else "(as acquired)"

    return [
        "# ---- cryoSPARC (GUI; no command line): import the poses, then reconstruct without refinement",
        "# 1. Job 'Import Particle Stack':",
        f"#      Particle meta path : {star}",
        f"#      Particle data path : {stacks[0] if len(stacks) == 1 else 'a folder holding the stacks of: ' + ', '.join(stacks)}",
        f"#      Pixel size {opt('rlnImagePixelSize', 'Å')}, voltage {opt('rlnVoltage', 'kV')}, "
        f"Cs {opt('rlnSphericalAberration', 'mm')}, amplitude contrast {opt('rlnAmplitudeContrast', '')}".rstrip(),
        f"#      Fields read from the STAR: {', '.join(fields)}",
        "# 2. Job 'Homogeneous Reconstruction Only' on the imported particles",
        f"#      Symmetry: {sym}; it keeps the imported poses and reports the half-map FSC.",
    ]


def _slurm_header(root: Path, partition: str | None, gres: str | None) -> list[str]:
    lines = [f"#SBATCH --job-name={SLURM_JOB_NAME}", f"#SBATCH --output={root / 'reconstruct_%j.log'}", "#SBATCH --ntasks=1"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if gres:
        lines.append(f"#SBATCH --gres={gres}")
    return lines


def _check_options(program: str, slurm: bool, partition: str | None, gres: str | None) -> None:
    """Refuse an unknown --program, and SLURM resources without --slurm."""
    if program not in PROGRAMS:
        raise DeepAlignError(f"--program {program}: must be one of {', '.join(PROGRAMS)}")
    if not slurm and (partition or gres):
        raise DeepAlignError("--partition/--gres: only used with --slurm; add --slurm")


def _particles_star(project: Path, proj: Project, star: Path | None) -> Path:
    """The STAR to reconstruct (absolute): --star, else PROJECT/align/aligned.star, else (refine ran
    without align) PROJECT/refine/refined.star; one must exist."""
    root = proj.root
    if star is None:
        star = root / "align" / "aligned.star"
        if not star.is_file() and proj.is_done("refine") and (root / REFINED_STAR).is_file():
            star = root / REFINED_STAR
        if not star.is_file():
            raise DeepAlignError(f"{star}: not found; run deepalign align {project} first (or pass --star)")
    return Path(star).resolve()


def _symmetry_name(sym: str | None, proj: Project) -> str:
    """Canonical point-group name: --sym, else the project's regions.symmetry, else C1."""
    sym_name = sym if sym is not None else (proj.stage_config("regions") or {}).get("symmetry", "C1")
    try:
        return canonical_name(sym_name)
    except UnknownSymmetry:
        raise DeepAlignError(f"--sym {sym_name}: unknown symmetry (RELION names: C1, Cn, Dn, T, O, I1, I2)")


def _pixel_size_override(table: ParticleTable, star: Path, proj: Project) -> float | None:
    """None when the STAR's optics hold a pixel size, else the project's (an error when neither has one)."""
    if table.optics is not None and "rlnImagePixelSize" in table.optics:
        return None
    angpix = proj.pixel_size_ang
    if angpix is None:
        raise DeepAlignError(f"{star}: no pixel size in data_optics and none recorded in {proj.yaml_path}")
    return angpix


def _build_script(table: ParticleTable, star: Path, sym_name: str, root: Path, angpix: float | None, program: str,
                  header: list[str], local: LocalRefine | None = None) -> tuple[str, ParticleTable | None, dict[Path, ParticleTable]]:
    """The script text (header + one section per program; `local`: RELION's local refinement after its
    reconstruction), the RELION halves table and the Xmipp .xmd files."""
    base = image_base_dir(table)
    lines = header + [
        "set -euo pipefail",
        "# relative image names (rlnImageName) resolve from this folder",
        f"cd {_q(base)}",
        "",
    ]
    halves, xmds = None, {}
    if program in ("relion", "all"):
        relion_lines, halves = _relion_section(table, star, sym_name, root, angpix)
        lines += relion_lines + [""]
        if local is not None:
            lines += _local_refine_lines(local, sym_name, base) + [""]
    if program in ("xmipp", "all"):
        xmipp_lines, xmds = _xmipp_section(table, base, sym_name, root, angpix)
        lines += xmipp_lines + [""]
    if program in ("cryosparc", "all"):
        lines += _cryosparc_section(table, star, base, sym_name) + [""]
    return "\n".join(lines).rstrip() + "\n", halves, xmds


def _write_outputs(root: Path, script: str, halves: ParticleTable | None, xmds: dict[Path, ParticleTable], angpix: float | None,
                   local: LocalRefine | None = None) -> None:
    """Write the halves STAR, relion_refine's particle copy and the .xmd files the script reads, then PROJECT/reconstruct.sh."""
    if halves is not None:
        write_particles(root / HALVES_STAR, halves, pixel_size_ang=angpix)
    if local is not None and local.copy is not None:
        write_particles(local.star, local.copy)
    if xmds:
        from ..io.xmipp import write_xmd

        for path, sub in xmds.items():
            write_xmd(path, sub)
    write_text_atomic(root / SCRIPT_NAME, script)


def command(
    project: Annotated[Path, typer.Argument(help="deepalign project folder")],
    program: Annotated[str, typer.Option("--program", help="relion, xmipp, cryosparc or all")] = "relion",
    star: Annotated[Optional[Path], typer.Option("--star", help="particles to reconstruct (default: PROJECT/align/aligned.star)")] = None,
    sym: Annotated[Optional[str], typer.Option("--sym", help="point group (default: the project regions.symmetry, else C1)")] = None,
    slurm: Annotated[bool, typer.Option("--slurm", help="add #SBATCH lines so the script can be submitted with sbatch")] = False,
    partition: Annotated[Optional[str], typer.Option("--partition", help="SLURM partition (with --slurm)")] = None,
    gres: Annotated[Optional[str], typer.Option("--gres", help="SLURM generic resources, e.g. gpu:1 (with --slurm)")] = None,
) -> None:
    """Print (and write to PROJECT/reconstruct.sh) commands that reconstruct the poses in RELION, Xmipp or cryoSPARC.

    deepalign reconstruct-args demo --program all
    deepalign reconstruct-args demo --star demo/consensus/consensus.star --slurm --partition cpu
    """
    _check_options(program, slurm, partition, gres)
    proj = Project.open(project)
    root = proj.root
    star_given = star is not None
    star = _particles_star(project, proj, star)
    table = read_particles(star)
    get_poses(table, hint="reconstruction needs the aligned poses")
    sym_name = _symmetry_name(sym, proj)
    angpix = _pixel_size_override(table, star, proj)
    local = _local_refine(proj, star, star_given, table, root / RELION_DIR / "map.mrc", angpix) if program in ("relion", "all") else None

    header = ["#!/usr/bin/env bash", *(_slurm_header(root, partition, gres) if slurm else []),
              f"# written by: deepalign reconstruct-args {project} --program {program} (particles: {star}, symmetry {sym_name})"]
    script, halves, xmds = _build_script(table, star, sym_name, root, angpix, program, header, local)
    _write_outputs(root, script, halves, xmds, angpix, local)
    typer.echo(script, nl=False)
    typer.echo(f"wrote {root / SCRIPT_NAME}" + (f" (submit with: sbatch {root / SCRIPT_NAME})" if slurm else ""), err=True)
