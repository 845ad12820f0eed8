"""`deepalign reconstruct-args`: the printed RELION commands run under real RELION and make a map."""

from __future__ import annotations

import json
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

from deepalign_cli.config import DeepAlignConfig
from deepalign_cli.core import geometry as g
from deepalign_cli.errors import DeepAlignError
from deepalign_cli.io.mrc import write_stack
from deepalign_cli.io.project import Project
from deepalign_cli.io.star import make_table, read_particles, write_particles
from deepalign_cli.io.xmipp import read_xmd
from deepalign_cli.main import app

N_PARTICLES = 200
BOX = 24
PIXEL_ANG = 3.0
BLOB_SIGMA_PX = 3.0

needs_relion = pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="relion_reconstruct not installed")


def _project(tmp_path, symmetry="C1", subsets=False):
    """A hand-made project: a centred Gaussian blob seen from random poses (every projection is the
    same 2D Gaussian) plus a little noise, in one stack; PROJECT/align/aligned.star with CTF."""
    root = tmp_path / "proj"
    cfg = DeepAlignConfig()
    cfg.regions.symmetry = symmetry
    Project.create(root, angpix=PIXEL_ANG, box=BOX, config=cfg)
    rng = np.random.default_rng(0)
    yx = np.arange(BOX) - BOX // 2
    blob = np.exp(-(yx[:, None] ** 2 + yx[None, :] ** 2) / (2 * BLOB_SIGMA_PX**2))
    images = blob[None] + 0.05 * rng.normal(size=(N_PARTICLES, BOX, BOX))
    write_stack(root / "Particles" / "stack.mrcs", images, PIXEL_ANG)
    eulers = g.matrix_to_euler(g.rotvec_to_matrix(rng.normal(size=(N_PARTICLES, 3)) * 2.0))
    ctf = {
        "defocus_u_ang": rng.uniform(8000, 12000, N_PARTICLES),
        "defocus_v_ang": rng.uniform(8000, 12000, N_PARTICLES),
        "defocus_angle_deg": rng.uniform(0, 180, N_PARTICLES),
        "voltage_kv": 300.0,
        "cs_mm": 2.7,
        "amplitude_contrast": 0.1,
    }
    extra = {"rlnRandomSubset": 1 + np.arange(N_PARTICLES) % 2} if subsets else None
    names = [f"{i + 1:06d}@Particles/stack.mrcs" for i in range(N_PARTICLES)]
    table = make_table(names, eulers, np.zeros((N_PARTICLES, 2)), PIXEL_ANG, BOX, ctf=ctf, extra_columns=extra)
    write_particles(root / "align" / "aligned.star", table)
    return root


def _run(*args):
    return CliRunner().invoke(app, ["reconstruct-args", *[str(a) for a in args]])


def _relion_lines(script):
    return [ln for ln in script.splitlines() if ln.startswith("relion_reconstruct ")]


@needs_relion
def test_printed_relion_commands_run_and_write_the_map(tmp_path):
    root = _project(tmp_path)
    res = _run(root, "--sym", "C1")
    assert res.exit_code == 0, res.output
    script = (root / "reconstruct.sh").read_text()
    assert script in res.output  # printed exactly as written
    lines = _relion_lines(script)
    assert len(lines) == 3
    assert all("--ctf" in ln and "--sym C1" in ln and "--angpix" not in ln for ln in lines)
    assert "--subset 1" in lines[1] and "--subset 2" in lines[2]
    # aligned.star has no rlnRandomSubset: a copy with alternate halves is used
    halves = read_particles(root / "reconstruct_halves.star")
    assert halves.particles["rlnRandomSubset"].tolist()[:4] == [1, 2, 1, 2]
    # run the script as a user would, from another folder
    proc = subprocess.run(["bash", str(root / "reconstruct.sh")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = root / "reconstruct_relion"
    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        with mrcfile.open(out / name, permissive=True) as m:
            vol = np.asarray(m.data, dtype=float)
            assert vol.shape == (BOX, BOX, BOX)
            assert float(m.voxel_size.x) == pytest.approx(PIXEL_ANG, rel=1e-4)
        assert np.all(np.isfinite(vol)) and np.abs(vol).max() > 0
    with mrcfile.open(out / "map.mrc", permissive=True) as m:
        vol = np.asarray(m.data, dtype=float)
    # the blob is at the centre: the central voxel is far above the map's average
    c = BOX // 2
    assert vol[c, c, c] > vol.mean() + 3 * vol.std()
    fsc = (out / "fsc.star").read_text()
    assert "_rlnFourierShellCorrelation" in fsc


@needs_relion
def test_existing_random_subsets_are_used_as_they_are(tmp_path):
    root = _project(tmp_path, symmetry="C4", subsets=True)
    res = _run(root)
    assert res.exit_code == 0, res.output
    lines = _relion_lines((root / "reconstruct.sh").read_text())
    assert all(str(root / "align" / "aligned.star") in ln and "--sym C4" in ln for ln in lines)
    assert not (root / "reconstruct_halves.star").exists()
    script = (root / "reconstruct.sh").read_text().splitlines()
    mkdir = [ln for ln in script if ln.startswith("mkdir -p ")]
    proc = subprocess.run(["bash", "-c", "\n".join(["set -e", f"cd {root}", *mkdir, *lines[1:]])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / "reconstruct_relion" / "half2.mrc").exists()


def test_all_programs_xmipp_conversion_and_slurm(tmp_path):
    root = _project(tmp_path)
    res = _run(root, "--program", "all", "--sym", "d7", "--slurm", "--partition", "cpu", "--gres", "gpu:1")
    assert res.exit_code == 0, res.output
    script = (root / "reconstruct.sh").read_text()
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --gres=gpu:1" in script
    assert script.index("#SBATCH") < script.index("set -euo pipefail")
    xmipp = [ln for ln in script.splitlines() if ln.startswith("xmipp_reconstruct_fourier ")]
    assert len(xmipp) == 3 and all("--sym d7" in ln and f"--sampling {PIXEL_ANG:g}" in ln and "--useCTF" in ln for ln in xmipp)
    full = read_xmd(root / "reconstruct.xmd")
    half1 = read_xmd(root / "reconstruct_half1.xmd")
    assert len(full) == N_PARTICLES and len(half1) == N_PARTICLES // 2
    assert str(full.particles["rlnImageName"].iloc[0]) == f"000001@{root / 'Particles' / 'stack.mrcs'}"
    np.testing.assert_allclose(full.particles["rlnAngleRot"].to_numpy(), read_particles(root / "align" / "aligned.star").particles["rlnAngleRot"].to_numpy(), atol=1e-4)
    assert "Import Particle Stack" in script and "Homogeneous Reconstruction Only" in script
    assert f"Particle data path : {root / 'Particles'}" in script


@pytest.mark.parametrize(
    "setup,args,fragments",
    [
        ("no_align", [], ["aligned.star", "run deepalign align"]),
        ("bad_sym", ["--sym", "Q3"], ["--sym Q3", "unknown symmetry"]),
        ("bad_program", ["--program", "eman"], ["--program eman"]),
        ("slurm_options_alone", ["--partition", "cpu"], ["--slurm"]),
        ("not_project", [], ["not a deepalign project"]),
    ],
)
def test_bad_requests_are_one_line_errors(tmp_path, setup, args, fragments):
    if setup == "not_project":
        root = tmp_path / "nothing"
        root.mkdir()
    else:
        root = _project(tmp_path)
        if setup == "no_align":
            (root / "align" / "aligned.star").unlink()
    res = _run(root, *args)
    assert res.exit_code != 0
    assert isinstance(res.exception, DeepAlignError)
    assert "\n" not in str(res.exception)
    assert all(f in str(res.exception) for f in fragments)
    assert not (root / "reconstruct.sh").exists()


# ---- RELION, last step: relion_refine_mpi continuing from deepalign's poses

from deepalign_cli.commands.reconstruct_args import healpix_order  # noqa: E402
from deepalign_cli.io.mrc import write_map  # noqa: E402

REFINE_HISTORY_STEPS = (None, 4.7636, 3.6156)  # iteration 0 has no search; the last step is 3.6156° → order 5 (1.875°)
REFINED_RESOLUTION_ANG = 20.523


def _add_refine(root, done=True):
    """refine/ as `deepalign refine` writes it: refined.star (+ rlnRandomSubset), map.mrc, summary.json."""
    table = read_particles(root / "align" / "aligned.star")
    table.particles["rlnRandomSubset"] = 1 + np.arange(len(table)) % 2
    write_particles(root / "refine" / "refined.star", table)
    write_map(root / "refine" / "map.mrc", np.zeros((BOX,) * 3, np.float32), PIXEL_ANG)
    history = [{"iteration": i, "resolution_ang": 25.0} | ({} if s is None else {"angular_step_deg": s}) for i, s in enumerate(REFINE_HISTORY_STEPS)]
    summary = {"resolution_ang": REFINED_RESOLUTION_ANG, "iterations": len(history) - 1, "history": history}
    (root / "refine" / "summary.json").write_text(json.dumps(summary))
    if done:
        Project.open(root).mark_done("refine", outputs=[root / "refine" / "refined.star"], resolution_ang=REFINED_RESOLUTION_ANG, iterations=2)


def _local_refine(script):
    """The relion_refine_mpi line as {flag: value} (True for a flag without value), and the line above it."""
    lines = script.splitlines()
    (k,) = [i for i, ln in enumerate(lines) if "relion_refine_mpi" in ln and not ln.lstrip().startswith("#")]
    assert lines[k].startswith("  ") and lines[k - 3].startswith('if [[ "${DEEPALIGN_RELION_REFINE:-0}" == 1 ]]') and lines[k + 1] == "fi"
    words = lines[k].split()
    assert words[:4] == ["mpirun", "-n", "3", "relion_refine_mpi"]
    flags, i = {}, 4
    while i < len(words):
        takes_value = i + 1 < len(words) and not words[i + 1].startswith("--")
        flags[words[i]] = words[i + 1] if takes_value else True
        i += 2 if takes_value else 1
    return flags, lines[k - 1]


@pytest.mark.parametrize("step,order", [(60, 0), (100, 0), (15, 2), (14.9, 3), (10, 3), (7.5, 3), (4.7636, 4), (3.75, 4),
                                        (3.6156, 5), (1.875, 5), (1.0, 6), (0.9375, 6)])
def test_healpix_order_is_the_coarsest_sampling_at_most_the_step(step, order):
    assert healpix_order(step) == order


def test_local_refine_without_refine_starts_from_the_aligned_poses_and_the_relion_map(tmp_path):
    root = _project(tmp_path)
    res = _run(root)
    assert res.exit_code == 0, res.output
    flags, comment = _local_refine((root / "reconstruct.sh").read_text())
    assert comment.lstrip().startswith("# ")
    assert flags["--i"] == str(root / "align" / "aligned.star")
    assert flags["--ref"] == str(root / "reconstruct_relion" / "map.mrc")  # the map the script's relion_reconstruct writes
    # no summary.json: 7.5° → order 3, sigma 15°; no resolution: 30 Å
    assert (flags["--healpix_order"], flags["--auto_local_healpix_order"], flags["--sigma_ang"], flags["--ini_high"]) == ("3", "3", "15", "30")
    assert flags["--particle_diameter"] == f"{BOX * PIXEL_ANG:g}" and flags["--sym"] == "C1"
    assert {f: flags[f] for f in ("--offset_range", "--offset_step", "--pad", "--o")} == \
        {"--offset_range": "3", "--offset_step": "1", "--pad": "2", "--o": "Refine3D/deepalign_local/run"}
    assert all(flags[f] is True for f in ("--auto_refine", "--split_random_halves", "--ctf", "--flatten_solvent", "--zero_mask"))
    assert "--firstiter_cc" not in flags
    # align's summary.json gives the step: 4° → order 4 (3.75°), sigma 8°
    (root / "align" / "summary.json").write_text(json.dumps({"angular_step_deg": 4.0}))
    flags, _ = _local_refine(_run(root).output)
    assert (flags["--healpix_order"], flags["--sigma_ang"]) == ("4", "8")


def test_local_refine_continues_from_refine_when_it_finished(tmp_path):
    root = _project(tmp_path, symmetry="C4")
    (root / "align" / "summary.json").write_text(json.dumps({"angular_step_deg": 10.0}))
    _add_refine(root, done=False)  # refine/ of an unfinished run: not used
    flags, _ = _local_refine(_run(root).output)
    assert flags["--i"] == str(root / "align" / "aligned.star") and flags["--healpix_order"] == "3" and flags["--ini_high"] == "30"
    _add_refine(root)
    res = _run(root)
    assert res.exit_code == 0, res.output
    script = (root / "reconstruct.sh").read_text()
    flags, _ = _local_refine(script)
    assert flags["--i"] == str(root / "refine" / "refined.star") and flags["--ref"] == str(root / "refine" / "map.mrc")
    assert flags["--ini_high"] == f"{REFINED_RESOLUTION_ANG:g}" and flags["--sym"] == "C4"
    assert (flags["--healpix_order"], flags["--auto_local_healpix_order"], flags["--sigma_ang"]) == ("5", "5", "7.231")  # 2 × 3.6156°
    assert not any("refined.star" in ln for ln in _relion_lines(script))  # relion_reconstruct: the aligned poses still
    # an explicit --star other than refine's: those poses, their map, align's step
    flags, _ = _local_refine(_run(root, "--star", root / "align" / "aligned.star").output)
    assert flags["--i"] == str(root / "align" / "aligned.star") and flags["--ref"] == str(root / "reconstruct_relion" / "map.mrc")
    assert (flags["--healpix_order"], flags["--sigma_ang"], flags["--ini_high"]) == ("3", "20", "30")
    # refine without align: refine's particles for everything
    (root / "align" / "aligned.star").unlink()
    res = _run(root)
    assert res.exit_code == 0, res.output
    script = (root / "reconstruct.sh").read_text()
    assert all(str(root / "refine" / "refined.star") in ln for ln in _relion_lines(script))
    assert _local_refine(script)[0]["--i"] == str(root / "refine" / "refined.star")


def test_local_refine_gets_a_copy_with_the_pixel_size_when_the_star_has_none(tmp_path):
    import starfile

    root = _project(tmp_path)
    table = read_particles(root / "align" / "aligned.star")
    bare = root / "align" / "no_optics.star"
    starfile.write({"particles": table.particles.drop(columns=["rlnOpticsGroup"])}, bare)
    res = _run(root, "--star", bare)
    assert res.exit_code == 0, res.output
    flags, _ = _local_refine((root / "reconstruct.sh").read_text())
    copy = root / "reconstruct_local_refine.star"
    assert flags["--i"] == str(copy) and flags["--particle_diameter"] == f"{BOX * PIXEL_ANG:g}"
    written = read_particles(copy)
    assert float(written.optics["rlnImagePixelSize"].iloc[0]) == PIXEL_ANG and len(written) == N_PARTICLES


@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="relion_refine not installed")
def test_local_refine_flags_exist_in_the_installed_relion_refine(tmp_path):
    root = _project(tmp_path)
    _add_refine(root)
    flags, _ = _local_refine(_run(root).output)
    help_text = subprocess.run(["relion_refine", "--help"], capture_output=True, text=True, timeout=60)
    known = {w for ln in (help_text.stdout + help_text.stderr).splitlines() for w in ln.split() if w.startswith("--")}
    assert set(flags) <= known, set(flags) - known
