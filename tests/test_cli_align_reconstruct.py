"""`deepalign align` and `deepalign reconstruct` end to end on a small simulated project.

Project: `deepalign simulate --n-particles 150 --box 32` (shipped 70S map, 10.16 Å/px, CTF, SNR 0.1,
origins ≤ 3 px), `label` on its 15-particle subset, and a predictions.star written here with the
TRUE region of every particle first and its neighbour (region + 1) second, as `predict` would give
with a perfect network. Everything runs in this process (CliRunner) so JAX compiles once.

Thresholds (measured on this project, step 10°):
* Pose error. The step-10° gallery alone is within sqrt((0.77·10)² + 5²) = 9.2° of any pose
  (tests/test_search.py); three refinement passes bring noise-free data to ≤ 1.1°. At SNR 0.1 and
  a 30 Å low-pass noise moves the correlation peak: measured median 2.6°, 93 % within 10°. We
  assert median ≤ 5° (half the coarse grid bound) and ≥ 80 % within 10° (the coarse bound).
  Shifts of those particles: median within 1 px (measured 0.08 px).
* RELION: relion_reconstruct of aligned.star, low-passed to the 30 Å search band, correlates 0.91
  with the simulated map (0.91 from the true poses; negated origins give 0.07, a transposed pose
  0.38), so ≥ 0.8 proves RELION reads our angles and origins as we wrote them.
* Noise-free (SNR 1e6) reconstruction from the true poses: FSC 0.143 at Nyquist (20.3 Å) measured;
  we allow Nyquist / 0.8 (25.4 Å) as tests/test_reconstruction.py does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

from deepalign_cli import main
from deepalign_cli.commands import _reconstruction
from deepalign_cli.commands.simulate import shipped_map
from deepalign_cli.core import gallery, geometry, preprocess, reconstruction, regions, symmetry
from deepalign_cli.errors import DeepAlignError
from deepalign_cli.io import star
from deepalign_cli.io.project import Project
from deepalign_cli.particles import ParticleSource

N, BOX, STEP = 150, 32, "10"
PIXEL = 5.0 * 65 / BOX  # the shipped map is 65 px at 5 Å
BAND_ANG = 3 * PIXEL  # align's default low-pass without a target resolution (the paper's pixel = res/3)
C1 = symmetry.symmetry_operators("C1")
CENTRES = regions.region_centres(30.0, C1)


def run(*args):
    return CliRunner().invoke(main.app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def one_line_error(result, *needles):
    assert result.exit_code == 1 and isinstance(result.exception, DeepAlignError), result.output
    msg = str(result.exception)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def true_regions(root):
    eulers, _ = star.get_poses(star.read_particles(root / "simulated" / "truth.star"))
    idx, _ = regions.assign_regions(geometry.projection_direction(eulers[:, 0], eulers[:, 1]), CENTRES, C1)
    return idx


def write_predictions(root):
    """predictions.star as `predict` writes it: project order, 'top1,top2', top-1 column."""
    parts = star.read_particles(root / "simulated" / "particles.star")
    top1 = true_regions(root)
    df = parts.particles[["rlnImageName"]].copy()
    df["rlnDeepAlignRegions"] = [f"{a},{(a + 1) % len(CENTRES)}" for a in top1]
    df["rlnDeepAlignRegion1"] = top1
    star.write_particles(root / "predict" / "predictions.star", star.ParticleTable(df, parts.optics, parts.source))


def rotation_errors(a, b):
    return np.asarray(geometry.rotation_distance_deg(geometry.eulers_to_matrices(a), geometry.eulers_to_matrices(b)))


def corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """SNR 0.1 project, labelled, with perfect predictions, aligned once against the true map."""
    root = tmp_path_factory.mktemp("cli") / "noisy"
    ok(run("simulate", root, "--n-particles", N, "--box", BOX))
    ok(run("label", root, "--subset", root / "simulated" / "subset.star"))
    write_predictions(root)
    ok(run("align", root, "--reference", root / "simulated" / "map.mrc", "--angular-step", STEP))
    shutil.copy(root / "align" / "aligned.star", root / "single_run.star")
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Noise-free project (SNR 1e6), no labels, no predictions."""
    root = tmp_path_factory.mktemp("cli") / "clean"
    ok(run("simulate", root, "--n-particles", N, "--box", BOX, "--snr", "1e6"))
    return root


def test_align_with_true_regions_recovers_poses_at_snr_0_1(project):
    aligned = star.read_particles(project / "single_run.star")
    truth = star.read_particles(project / "simulated" / "truth.star")
    inputs = star.read_particles(project / "simulated" / "particles.star")
    assert set(inputs.particles.columns) <= set(aligned.particles.columns)
    assert list(aligned.particles["rlnImageName"]) == list(inputs.particles["rlnImageName"])
    (e_a, o_a), (e_t, o_t) = star.get_poses(aligned), star.get_poses(truth)
    err = rotation_errors(e_a, e_t)
    assert np.median(err) <= 5.0 and np.mean(err <= 10.0) >= 0.8
    good = err <= 10.0
    assert np.median(np.abs(o_a - o_t)[good]) / PIXEL <= 1.0  # origins written in Å
    found, _ = regions.assign_regions(geometry.projection_direction(e_a[:, 0], e_a[:, 1]), CENTRES, C1)
    np.testing.assert_array_equal(aligned.particles["rlnDeepAlignRegion"], found)  # the region of the written pose
    summary = json.loads((project / "align" / "summary.json").read_text())
    assert summary["mode"] == "restricted" and summary["n_particles"] == N and summary["particles_per_s"] > 0
    assert summary["angular_step_deg"] == 10.0 and summary["mean_candidate_regions"] == 2.0
    assert summary["whole_unit_particles"] == 0  # two regions of 42: far less than the sphere
    # simulated/map.mrc has no half maps beside it: low-passed to the default band
    assert summary["reference_filter"].startswith("low-passed") and summary["lowpass_resolution_ang"] == pytest.approx(BAND_ANG, abs=1e-3)
    assert all((project / "align" / f).stat().st_size > 0 for f in ("scores.png", "angles.png"))
    assert Project.open(project).is_done("align")


def test_aligned_star_is_accepted_by_relion_reconstruct(project, tmp_path):
    if shutil.which("relion_reconstruct") is None:
        pytest.skip("relion_reconstruct not installed")
    out = tmp_path / "relion.mrc"
    subprocess.run(["relion_reconstruct", "--i", "single_run.star", "--o", str(out), "--ctf"],
                   cwd=project, check=True, capture_output=True, timeout=120)
    ours = mrcfile.read(out)
    ref = mrcfile.read(project / "simulated" / "map.mrc")
    assert ours.shape == ref.shape
    lp = lambda v: np.asarray(preprocess.lowpass_volume(v, PIXEL, BAND_ANG))  # noqa: E731
    assert corr(lp(ours), lp(ref)) >= 0.8


def test_restricted_search_returns_the_exhaustive_pose_when_the_truth_is_a_candidate(project):
    top1 = true_regions(project)
    counts = np.bincount(top1, minlength=len(CENTRES))
    region = int(np.flatnonzero(counts >= 2)[np.argmin(counts[counts >= 2])])  # a few particles
    ok(run("align", project, "--exhaustive", "--regions", region, "--reference", project / "simulated" / "map.mrc", "--angular-step", STEP))
    ex = star.read_particles(project / "align_exhaustive" / "shards" / f"aligned_{region}.star").particles.set_index("rlnImageName")
    single = star.read_particles(project / "single_run.star").particles.set_index("rlnImageName").loc[ex.index]
    assert len(ex) == counts[region] and not (project / "align_exhaustive" / "aligned.star").exists()
    same_regions = np.isin(ex["rlnDeepAlignRegion"].to_numpy(), [region, (region + 1) % len(CENTRES)])
    assert same_regions.sum() >= 1
    cols = list(star.ANGLE_COLUMNS)
    diff = rotation_errors(ex[cols].to_numpy(float)[same_regions], single[cols].to_numpy(float)[same_regions])
    assert np.all(diff < 0.01)
    o = list(star.ORIGIN_ANG_COLUMNS)
    np.testing.assert_allclose(ex[o].to_numpy(float)[same_regions], single[o].to_numpy(float)[same_regions], atol=1e-3 * PIXEL)


def test_region_shards_merged_equal_a_single_run(project):
    ref = project / "simulated" / "map.mrc"
    ok(run("align", project, "--regions", "0-20", "--reference", ref, "--angular-step", STEP))
    missing = one_line_error(run("align", project, "--merge", "--force"), "particles are in no shard", "--regions")
    top1 = true_regions(project)
    assert f"{(top1 >= 21).sum()} of {N}" in missing and str(int(top1[top1 >= 21].min())) in missing
    ok(run("align", project, "--regions", "21-41", "--reference", ref, "--angular-step", STEP))
    ok(run("align", project, "--merge", "--force"))
    merged = star.read_particles(project / "align" / "aligned.star").particles
    single = star.read_particles(project / "single_run.star").particles
    assert list(merged["rlnImageName"]) == list(single["rlnImageName"])
    cols = [*star.ANGLE_COLUMNS, *star.ORIGIN_ANG_COLUMNS]
    assert rotation_errors(merged[cols[:3]].to_numpy(float), single[cols[:3]].to_numpy(float)).max() < 0.01
    np.testing.assert_allclose(merged[cols[3:]].to_numpy(float), single[cols[3:]].to_numpy(float), atol=1e-3 * PIXEL)
    np.testing.assert_allclose(merged["rlnDeepAlignScore"], single["rlnDeepAlignScore"], atol=1e-4)
    assert (project / "align" / "shards" / "aligned_0-20.star").is_file()  # shards survive the merge
    assert json.loads((project / "align" / "summary.json").read_text())["shards"] == ["aligned_0-20.star", "aligned_21-41.star"]


def test_default_reference_is_the_labelled_subset_reconstruction(project, capsys):
    proj = Project.open(project)
    pre = _reconstruction.project_preprocess(proj, None)
    source = ParticleSource(star.read_particles(proj.particles_star), pre)
    on_the_fly = _reconstruction.load_reference(proj, None, source, pre, None)
    assert "on the fly" in on_the_fly.description and "reconstructing the reference" in capsys.readouterr().err
    ok(run("reconstruct", project, "--from", project / "label" / "labels.star", "--out", "reference"))
    from_file = _reconstruction.load_reference(proj, None, source, pre, None)
    assert from_file.description.endswith("reconstruct/reference/map.mrc")
    np.testing.assert_allclose(from_file.map, on_the_fly.map, atol=1e-5 * np.abs(on_the_fly.map).max())
    # both carry the FSC of their half maps (the same halves: the same seed), which align weights the map by
    np.testing.assert_allclose(from_file.fsc, on_the_fly.fsc, atol=1e-4)
    assert len(from_file.fsc) == BOX // 2 + 1 and from_file.fsc[1] > 0.3  # 0.47 measured (a small noisy subset)


def test_search_reference_weights_a_map_with_halves_by_their_fsc_and_scores_the_band_they_support():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(BOX, BOX, BOX)).astype(np.float32)
    geo = gallery.search_geometry(BOX, PIXEL)
    curve = np.r_[np.linspace(1.0, 0.2, 10), -0.05, np.full(BOX // 2 + 1 - 11, 0.3)]  # noise from shell 10 on
    ones = np.ones_like(vol)  # the filter alone (the mask: tests/test_mask.py)
    weighted, band, how = _reconstruction.search_reference(_reconstruction.Reference(vol, "x", curve), PIXEL, geo, None, ones)
    assert "FSC" in how and band == pytest.approx(BOX * PIXEL / 9)  # shell 9, the last one before the FSC ≤ 0
    shells = reconstruction.shell_index(BOX)
    ratio = np.abs(np.fft.fftn(weighted)) / np.maximum(np.abs(np.fft.fftn(vol)), 1e-6)
    np.testing.assert_allclose(ratio[shells == 5], np.sqrt(2 * curve[5] / (1 + curve[5])), rtol=1e-3)
    assert ratio[shells >= 10].max() < 1e-4
    full, band_full, _ = _reconstruction.search_reference(_reconstruction.Reference(vol, "x", np.ones(BOX // 2 + 1)), PIXEL, geo, None, ones)
    assert band_full == pytest.approx(2 * PIXEL)  # every shell kept: to Nyquist
    inside = shells <= BOX // 2
    np.testing.assert_allclose(np.fft.fftn(full)[inside], np.fft.fftn(vol)[inside], atol=1e-2)
    for ref, lowpass in ((_reconstruction.Reference(vol, "x"), None), (_reconstruction.Reference(vol, "x", curve), 30.0)):
        g = gallery.search_geometry(BOX, PIXEL, lowpass_resolution_ang=lowpass)  # no halves, or a band the user set
        out, b, how = _reconstruction.search_reference(ref, PIXEL, g, lowpass, ones)
        assert how.startswith("low-passed") and b == g.resolution_ang
        np.testing.assert_allclose(out, preprocess.lowpass_volume(vol, PIXEL, g.resolution_ang), atol=1e-5)


def test_reference_at_another_pixel_size_is_resampled_with_a_notice(project, tmp_path, capsys):
    fine = tmp_path / "fine.mrc"
    with mrcfile.new(fine) as m:  # the shipped map (no voxel size in its header) at its 5 Å
        m.set_data(mrcfile.read(shipped_map()))
        m.voxel_size = 5.0
    vol = _reconstruction.reference_at_working_geometry(fine, BOX, PIXEL)  # 65 px at 5 Å → 32 px at 10.16 Å
    assert "resampled" in capsys.readouterr().err
    np.testing.assert_allclose(vol, mrcfile.read(project / "simulated" / "map.mrc"), atol=1e-4 * np.abs(vol).max())


def test_reference_that_cannot_be_resampled_is_a_one_line_error(clean, tmp_path):
    vol = mrcfile.read(clean / "simulated" / "map.mrc")
    coarse, odd = tmp_path / "coarse.mrc", tmp_path / "odd.mrc"
    with mrcfile.new(coarse) as m:  # 16 px at 2× the particles' pixel
        m.set_data(np.asarray(preprocess.fourier_crop_volume(vol, 16)))
        m.voxel_size = 2 * PIXEL
    with mrcfile.new(odd) as m:  # 40 px at 8 Å: 31.5 px at the working pixel, 1.5 % off either way
        m.set_data(np.zeros((40, 40, 40), np.float32))
        m.voxel_size = 8.0
    one_line_error(run("align", clean, "--exhaustive", "--reference", coarse), "coarse.mrc", "coarser than")
    one_line_error(run("align", clean, "--exhaustive", "--reference", odd), "odd.mrc", "cannot be Fourier-cropped")
    empty = tmp_path / "empty_mask.mrc"
    with mrcfile.new(empty) as m:
        m.set_data(np.zeros_like(vol))
        m.voxel_size = PIXEL
    one_line_error(run("align", clean, "--exhaustive", "--mask", tmp_path / "absent.mrc"), "absent.mrc", "mask not found")
    one_line_error(run("align", clean, "--exhaustive", "--mask", empty), "empty_mask.mrc", "no positive values")
    one_line_error(run("align", clean, "--exhaustive", "--mask", coarse), "coarse.mrc", "coarser than")
    assert not (clean / "align_exhaustive").exists()


def test_align_masks_its_reference_with_a_solvent_mask_unless_given_one(project, tmp_path):
    ok(run("align", project, "--exhaustive", "--reference", project / "simulated" / "map.mrc", "--angular-step", STEP, "--force"))
    summary = json.loads((project / "align_exhaustive" / "summary.json").read_text())
    assert "solvent mask made from it" in summary["reference_filter"]
    box_mask = tmp_path / "box_mask.mrc"
    with mrcfile.new(box_mask) as m:  # all ones: the search sees the low-passed map alone
        m.set_data(np.ones((BOX, BOX, BOX), np.float32))
        m.voxel_size = PIXEL
    ok(run("align", project, "--exhaustive", "--reference", project / "simulated" / "map.mrc", "--mask", box_mask,
           "--angular-step", STEP, "--force"))
    summary = json.loads((project / "align_exhaustive" / "summary.json").read_text())
    assert "the given mask (100.0 % of the box)" in summary["reference_filter"]


def test_missing_predictions_is_a_one_line_error_and_creates_no_align_folder(clean, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["deepalign", "align", str(clean)])
    with pytest.raises(SystemExit) as e:
        main.run()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1
    assert "predictions.star" in err and "run deepalign predict first" in err
    assert not (clean / "align").exists() and not Project.open(clean).is_done("align")


def test_reconstruct_from_true_poses_reaches_nyquist_on_noise_free_data(clean):
    ok(run("reconstruct", clean, "--from", clean / "simulated" / "truth.star"))
    out = clean / "reconstruct" / "truth"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_particles"] == N and summary["ctf_corrected"]
    assert summary["resolution_ang"] <= 2 * PIXEL / 0.8
    with mrcfile.open(out / "map.mrc") as m:
        assert float(m.voxel_size.x) == pytest.approx(PIXEL, rel=1e-5)
        full = m.data.copy()
    assert corr(full, mrcfile.read(clean / "simulated" / "map.mrc")) > 0.9
    assert (out / "fsc.png").stat().st_size > 0 and len((out / "fsc.csv").read_text().splitlines()) == BOX // 2 + 2
    assert Project.open(clean).is_done("reconstruct_truth")
    one_line_error(run("reconstruct", clean, "--from", clean / "simulated" / "truth.star"), "--force")


def test_lowpass_filters_only_the_written_map(clean):
    ok(run("reconstruct", clean, "--from", clean / "simulated" / "truth.star", "--out", "lp", "--lowpass", "40"))
    lp, unf = clean / "reconstruct" / "lp", clean / "reconstruct" / "truth"
    np.testing.assert_array_equal(mrcfile.read(lp / "half1.mrc"), mrcfile.read(unf / "half1.mrc"))
    ft = np.fft.fftshift(np.abs(np.fft.fftn(mrcfile.read(lp / "map.mrc"))))
    k = np.linalg.norm(np.indices(ft.shape) - BOX // 2, axis=0)
    assert ft[k > BOX * PIXEL / 40].max() < 1e-3 * ft.max()
