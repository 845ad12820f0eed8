"""The foundation commands end to end through the real CLI: simulate, label, init, --force, RELION.

Every command runs in a fresh interpreter (`conftest.run_deepalign`), on the session's tiny
simulated project (200 particles, box 32, see conftest.py).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import BOX_PX, N_PARTICLES, N_SUBSET, SIM_ARGS, SIM_PIXEL_ANG, run_deepalign
from deepalign_cli.core import geometry, regions
from deepalign_cli.core.symmetry import symmetry_operators
from deepalign_cli.io import star
from deepalign_cli.io.cryosparc import read_cs
from deepalign_cli.io.xmipp import write_xmd
from deepalign_cli import main as main_module
from deepalign_cli.main import STAGES

SIM_SNR = 0.1  # the simulate default the session project was made with
CLEAN_SNR = 1e6  # noise σ² = var/1e6: "noise-free" images with the same poses and noise draws
SNR_RTOL = 0.05  # σ is set from the variance of these same 200 clean images, so the ratio is near exact
DEFAULT_REGIONS_C1_30 = 42
RELION_MIN_CORRELATION = 0.5
"""relion_reconstruct of the 200 noisy particles (SNR 0.1) with the true poses correlates 0.66 with
simulated/map.mrc; any convention error measured on this data set gives ≤ 0.16 (transposed
rotations 0.14, negated rot/psi 0.09, origins of the wrong sign 0.03, shuffled poses 0.10, the right
poses against the mirrored map 0.16). 0.5 sits between the two with margin on both sides."""
RELION_WRONG_POSES_MAX_CORRELATION = 0.3


def _label_args(project, subset=None, *extra):
    return ("label", project, "--subset", subset if subset is not None else project / "simulated" / "subset.star", *extra)


def _expected_regions(eulers_deg: np.ndarray, sym: str, spacing_deg: float):
    ops = symmetry_operators(sym)
    centres = regions.region_centres(spacing_deg, ops)
    dirs = geometry.projection_direction(eulers_deg[:, 0], eulers_deg[:, 1])
    return regions.assign_regions(dirs, centres, ops)[0], len(centres)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# --------------------------------------------------------------------------------------------- help


def test_help_lists_every_stage_and_marks_the_unbuilt_ones():
    result = run_deepalign("--help", check=True)
    lines = result.stdout.splitlines()
    for name, module, _ in STAGES:
        line = next((ln for ln in lines if f" {name} " in ln), None)
        assert line is not None, f"stage {name} missing from deepalign --help"
        if importlib.util.find_spec(f"deepalign_cli.commands.{module}") is None:
            assert "not built yet" in line, f"unbuilt stage {name} is not marked in --help: {line!r}"


def test_help_shows_no_value_after_flags_and_the_type_after_options_that_take_one():
    """`--force` takes no value, so --help shows nothing after it (typer would print `<bool>`);
    `--epochs <int>` keeps its type. Every stage's help and the top-level help."""
    import typer.main
    from typer.testing import CliRunner

    group = typer.main.get_command(main_module.app)
    runner = CliRunner()
    top = runner.invoke(main_module.app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0 and "--help" in top.output and "<bool>" not in top.output
    for name, _, _ in STAGES:
        result = runner.invoke(main_module.app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, f"deepalign {name} --help:\n{result.output}"
        command = group.commands[name]
        with command.make_context(name, [], resilient_parsing=True) as ctx:
            for param in (p for p in command.get_params(ctx) if p.param_type_name == "option"):
                line = next(ln for ln in result.output.splitlines() if param.opts[0] in ln.split())
                shown = param.display_type_rich(ctx)
                if param.is_flag:
                    assert not shown, (name, line)
                else:
                    assert shown and shown.startswith("<") and shown in line, (name, param.opts[0], line)
    train = runner.invoke(main_module.app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert any("--epochs" in ln and "<int>" in ln for ln in train.splitlines())
    assert any(ln.split()[1:3] == ["--force", "redo"] for ln in train.splitlines())


def test_a_stage_process_imports_only_its_own_command_module():
    """`deepalign STAGE …` builds the CLI with the other stages as placeholders (their help kept):
    reconstruct never imports the training stack."""
    code = ("import sys; sys.argv = ['deepalign', 'reconstruct', '--help']\n"
            "import deepalign_cli.main as m\n"
            "try:\n    m.run()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('LOADED', sorted(k.rsplit('.', 1)[1] for k in sys.modules if k.startswith('deepalign_cli.commands.')),"
            " 'optax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage: deepalign reconstruct" in out
    loaded = out[out.index("LOADED"):]
    assert "'reconstruct'" in loaded and "'train'" not in loaded and "'label'" not in loaded and loaded.rstrip().endswith("False")
    assert main_module._requested_stage(["deepalign", "--help"]) is None
    assert main_module._requested_stage(["deepalign", "train", "p", "--config", "x.yaml"]) == "train"
    assert main_module._requested_stage(["deepalign", "nonsense"]) is None
    app = main_module.build_app("label")  # every stage is still listed
    assert [c.name for c in app.registered_commands] == [name for name, _, _ in STAGES]


# ----------------------------------------------------------------------------------------- simulate


def test_simulate_writes_stack_stars_and_map_with_one_pixel_size(sim_project):
    sim = sim_project / "simulated"
    with mrcfile.open(sim / "particles.mrcs", permissive=True) as m:
        assert m.data.shape == (N_PARTICLES, BOX_PX, BOX_PX)
        assert m.is_image_stack()
        assert float(m.voxel_size.x) == pytest.approx(SIM_PIXEL_ANG, rel=1e-5)
        assert np.all(np.isfinite(m.data)) and float(m.data.std()) > 0
    with mrcfile.open(sim / "map.mrc", permissive=True) as m:
        assert m.data.shape == (BOX_PX,) * 3 and m.is_volume()
        assert float(m.voxel_size.x) == pytest.approx(SIM_PIXEL_ANG, rel=1e-5)
    for name in ("particles.star", "truth.star", "subset.star"):
        table = star.read_particles(sim / name)
        assert star.pixel_size(table) == pytest.approx(SIM_PIXEL_ANG, rel=1e-5), name
        assert star.box_size(table) == BOX_PX, name
        assert star.get_ctf_params(table) is not None, name
    state = yaml.safe_load((sim_project / "project.yaml").read_text())
    assert state["stages"]["simulate"]["done"] is True
    assert state["inputs"]["particles_star"] == str((sim / "particles.star").resolve())
    assert state["inputs"]["pixel_size_ang"] == pytest.approx(SIM_PIXEL_ANG) and state["inputs"]["box_px"] == BOX_PX


def test_simulate_truth_has_every_pose_and_particles_star_has_none(sim_project):
    truth = star.read_particles(sim_project / "simulated" / "truth.star")
    unaligned = star.read_particles(sim_project / "simulated" / "particles.star")
    expected_names = [f"{i:06d}@simulated/particles.mrcs" for i in range(1, N_PARTICLES + 1)]
    assert star.image_names(truth) == expected_names == star.image_names(unaligned)
    eulers, origins = star.get_poses(truth)
    assert eulers.shape == (N_PARTICLES, 3) and np.all((eulers[:, 1] >= 0) & (eulers[:, 1] <= 180))
    assert np.abs(origins).max() > 0  # shifts are simulated and recorded in Å
    assert len(np.unique(np.round(eulers, 3), axis=0)) == N_PARTICLES
    assert not any(c in unaligned.particles for c in star.ANGLE_COLUMNS)


def test_simulate_subset_is_the_requested_fraction_with_true_poses(sim_project):
    truth = star.read_particles(sim_project / "simulated" / "truth.star").particles.set_index("rlnImageName")
    subset = star.read_particles(sim_project / "simulated" / "subset.star").particles.set_index("rlnImageName")
    assert len(subset) == N_SUBSET and subset.index.is_unique
    cols = [*star.ANGLE_COLUMNS, *star.ORIGIN_ANG_COLUMNS, "rlnDefocusU"]
    pd.testing.assert_frame_equal(subset[cols], truth.loc[subset.index, cols])


def test_simulate_noise_has_the_requested_snr_and_poses_do_not_depend_on_it(sim_project, tmp_path):
    clean_project = tmp_path / "clean"
    run_deepalign("simulate", clean_project, *SIM_ARGS, "--snr", str(CLEAN_SNR), check=True)
    noisy = mrcfile.read(sim_project / "simulated" / "particles.mrcs").astype(np.float64)
    clean = mrcfile.read(clean_project / "simulated" / "particles.mrcs").astype(np.float64)
    truth_noisy = star.read_particles(sim_project / "simulated" / "truth.star").particles
    truth_clean = star.read_particles(clean_project / "simulated" / "truth.star").particles
    pd.testing.assert_frame_equal(truth_noisy, truth_clean)
    measured_snr = clean.var() / (noisy - clean).var()
    assert measured_snr == pytest.approx(SIM_SNR, rel=SNR_RTOL)


def test_simulate_again_is_refused_without_force_and_same_seed_gives_identical_stack(sim_project):
    sim = sim_project / "simulated"
    before, truth_before = mrcfile.read(sim / "particles.mrcs"), star.read_particles(sim / "truth.star").particles
    refused = run_deepalign("simulate", sim_project, *SIM_ARGS)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"error: {sim_project.resolve()}: stage 'simulate' already done; use --force to redo"
    run_deepalign("simulate", sim_project, *SIM_ARGS, "--force", check=True)
    np.testing.assert_array_equal(mrcfile.read(sim / "particles.mrcs"), before)  # the header has a timestamp
    pd.testing.assert_frame_equal(star.read_particles(sim / "truth.star").particles, truth_before)


# -------------------------------------------------------------------------------------------- label


def test_label_regions_are_the_nearest_centres_of_the_true_poses(sim_project_labelled):
    out = sim_project_labelled / "label"
    subset = star.read_particles(sim_project_labelled / "simulated" / "subset.star")
    labels = star.read_particles(out / "labels.star")
    # the same images, named so that they are found from label/ (tests/test_label_paths.py)
    resolved = lambda t: [f"{int(n.split('@')[0])}@{(star.image_base_dir(t) / n.split('@')[1]).resolve()}" for n in star.image_names(t)]  # noqa: E731
    assert resolved(labels) == resolved(subset)
    expected, n_regions = _expected_regions(star.get_poses(subset)[0], "C1", 30.0)
    assert n_regions == DEFAULT_REGIONS_C1_30
    np.testing.assert_array_equal(labels.particles["rlnDeepAlignRegion"].to_numpy(), expected)
    assert np.all(labels.particles["rlnDeepAlignRegionDist"].to_numpy() <= 30.0)
    assert star.pixel_size(labels) == pytest.approx(SIM_PIXEL_ANG, rel=1e-5)
    table = pd.read_csv(out / "regions.csv")
    assert list(table["region"]) == list(range(n_regions))
    assert table["n_particles"].sum() == N_SUBSET
    np.testing.assert_array_equal(table["n_particles"].to_numpy(), np.bincount(expected, minlength=n_regions))
    assert (out / "regions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((sim_project_labelled / "project.yaml").read_text())["stages"]["label"]["n_regions"] == n_regions


def test_label_warns_about_regions_too_small_to_train(sim_project):
    warned = run_deepalign(*_label_args(sim_project), check=True)
    assert "warning:" in warned.stderr and "fewer than 10 particles" in warned.stderr


@pytest.mark.parametrize("fmt", ["xmd", "cs"])
def test_label_gives_the_same_regions_for_xmipp_and_cryosparc_files(sim_project, sim_project_labelled, tmp_path, fmt):
    subset = star.read_particles(sim_project / "simulated" / "subset.star")
    path = sim_project / f"subset.{fmt}"  # beside simulated/, which its relative image names start with
    if fmt == "xmd":
        write_xmd(path, subset)
    else:
        _write_cs(path, subset)
    run_deepalign(*_label_args(sim_project, path), check=True)
    got = star.read_particles(sim_project / "label" / "labels.star").particles
    want = star.read_particles(sim_project_labelled / "label" / "labels.star").particles
    np.testing.assert_array_equal(got["rlnDeepAlignRegion"].to_numpy(), want["rlnDeepAlignRegion"].to_numpy())
    np.testing.assert_allclose(got["rlnDeepAlignRegionDist"].to_numpy(), want["rlnDeepAlignRegionDist"].to_numpy(), atol=1e-3)
    assert [n.split("@")[0].lstrip("0") for n in got["rlnImageName"]] == [n.split("@")[0].lstrip("0") for n in want["rlnImageName"]]


def _write_cs(path, table: star.ParticleTable) -> None:
    """The subset as cryoSPARC would store it (io/cryosparc.py): pose = rotvec of Aᵀ, shift in px."""
    df = table.particles
    n, pixel = len(df), star.pixel_size(table)
    eulers, origins = star.get_poses(table)
    ctf = star.get_ctf_params(table)
    index_stack = [name.split("@", 1) for name in star.image_names(table)]
    fields = {
        "uid": np.arange(n, dtype=np.uint64) + 10**15,
        "blob/path": np.array([s.encode() for _, s in index_stack], dtype="S128"),
        "blob/idx": np.array([int(i) - 1 for i, _ in index_stack], dtype=np.uint32),
        "blob/shape": np.tile(np.array([BOX_PX, BOX_PX], np.uint32), (n, 1)),
        "blob/psize_A": np.full(n, pixel, np.float32),
        "alignments3D/pose": geometry.matrix_to_rotvec(np.swapaxes(geometry.eulers_to_matrices(eulers), -1, -2)).astype(np.float32),
        "alignments3D/shift": (origins / pixel).astype(np.float32),
        "alignments3D/psize_A": np.full(n, pixel, np.float32),
        "ctf/df1_A": ctf["defocus_u_ang"].astype(np.float32),
        "ctf/df2_A": ctf["defocus_v_ang"].astype(np.float32),
        "ctf/df_angle_rad": np.deg2rad(ctf["defocus_angle_deg"]).astype(np.float32),
        "ctf/accel_kv": ctf["voltage_kv"].astype(np.float32),
        "ctf/cs_mm": ctf["cs_mm"].astype(np.float32),
        "ctf/amp_contrast": ctf["amplitude_contrast"].astype(np.float32),
    }
    arr = np.zeros(n, dtype=[(k, v.dtype, v.shape[1:]) for k, v in fields.items()])
    for k, v in fields.items():
        arr[k] = v
    with open(path, "wb") as f:  # a file handle: np.save would append .npy to a name
        np.save(f, arr)
    np.testing.assert_allclose(star.get_poses(read_cs(path))[1], origins, atol=1e-3)  # the writer itself is right


def test_label_with_c4_symmetry_has_fewer_regions_and_labels_every_particle(sim_project, tmp_path):
    config = tmp_path / "no_minimum.yaml"
    config.write_text("label:\n  min_particles_per_region: 0\n")
    result = run_deepalign(*_label_args(sim_project, None, "--sym", "C4", "--spacing", "30", "--config", config), check=True)
    assert "warning" not in result.stderr  # no region is below a minimum of 0
    labels = star.read_particles(sim_project / "label" / "labels.star").particles
    expected, n_regions = _expected_regions(star.get_poses(star.read_particles(sim_project / "simulated" / "subset.star"))[0], "C4", 30.0)
    assert 1 < n_regions < DEFAULT_REGIONS_C1_30
    assert len(labels) == N_SUBSET
    np.testing.assert_array_equal(labels["rlnDeepAlignRegion"].to_numpy(), expected)
    assert pd.read_csv(sim_project / "label" / "regions.csv")["n_particles"].sum() == N_SUBSET
    assert yaml.safe_load((sim_project / "project.yaml").read_text())["config"]["regions"]["symmetry"] == "C4"


def test_label_again_is_refused_without_force_and_redone_with_it(sim_project_labelled):
    out = sim_project_labelled / "label"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    refused = run_deepalign(*_label_args(sim_project_labelled))
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"error: {sim_project_labelled.resolve()}: stage 'label' already done; use --force to redo"
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    run_deepalign(*_label_args(sim_project_labelled, None, "--force", "--spacing", "20"), check=True)
    assert len(pd.read_csv(out / "regions.csv")) == 92


# --------------------------------------------------------------------------------------------- init


def test_init_on_a_star_records_its_pixel_size_box_and_count(sim_project, tmp_path):
    truth = sim_project / "simulated" / "truth.star"
    result = run_deepalign("init", tmp_path / "proj", "--particles", truth, check=True)
    assert "200 particles" in result.stderr
    inputs = yaml.safe_load((tmp_path / "proj" / "project.yaml").read_text())["inputs"]
    assert inputs == {"particles_star": str(truth.resolve()), "pixel_size_ang": pytest.approx(SIM_PIXEL_ANG),
                      "box_px": BOX_PX, "n_particles": N_PARTICLES}


# ------------------------------------------------------------------------------------------- RELION


@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="relion_reconstruct not installed")
def test_relion_reconstructs_the_simulated_map_from_the_truth_star(sim_project):
    """RELION reads our STAR + stack from the project folder (relative image names) and its
    reconstruction with the true poses and CTFs matches the map the particles came from."""
    import subprocess

    truth = star.read_particles(sim_project / "simulated" / "truth.star")
    wrong = truth.copy()  # transposed rotations: the classic convention error, as a negative control
    eulers = star.get_poses(truth)[0]
    wrong.particles[list(star.ANGLE_COLUMNS)] = -eulers[:, ::-1]
    star.write_particles(sim_project / "wrong.star", wrong)
    reference = mrcfile.read(sim_project / "simulated" / "map.mrc")
    correlations = {}
    for name, star_file in (("truth", "simulated/truth.star"), ("wrong", "wrong.star")):
        done = subprocess.run(["relion_reconstruct", "--i", star_file, "--o", f"{name}_rec.mrc", "--ctf"],
                              cwd=sim_project, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        with mrcfile.open(sim_project / f"{name}_rec.mrc", permissive=True) as m:
            assert m.data.shape == (BOX_PX,) * 3
            assert float(m.voxel_size.x) == pytest.approx(SIM_PIXEL_ANG, rel=1e-4)
            correlations[name] = _corr(m.data, reference)
    assert correlations["truth"] > RELION_MIN_CORRELATION, correlations
    assert correlations["wrong"] < RELION_WRONG_POSES_MAX_CORRELATION, correlations
