"""`deepalign reconstruct-args`: the printed RELION commands run under real RELION and make a map."""

from __future__ import annotations

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
