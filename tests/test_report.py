"""`deepalign report`: the refined set (refine/) joins the report once the refine stage finished,
and the report is unchanged without it. Hand-made project (no images are read): the true poses, an
aligned set 3° off every particle, and a refine/ folder as `deepalign refine` writes it whose poses are
1°, 3° or 6° off (60 / 30 / 10 particles)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from deepalign_cli.config import DeepAlignConfig
from deepalign_cli.core import geometry as g
from deepalign_cli.io.mrc import write_map
from deepalign_cli.io.project import Project
from deepalign_cli.io.star import make_table, write_particles
from deepalign_cli.main import app

N = 100
BOX, PIXEL_ANG = 32, 4.0
REFINED_ERRORS_DEG = np.repeat([1.0, 3.0, 6.0], [60, 30, 10])  # median 1°, 60 % ≤ 2°, 90 % ≤ 5°, 100 % ≤ 10°
ALIGNED_ERROR_DEG = 3.0
REFINED_SHIFT_ERROR_PX = 0.5
SUMMARY = {  # as refine writes it (keys and history entries of a real run, 3 iterations)
    "from": "/data/P/align/aligned.star", "n_particles": N, "half_sizes": [50, 50], "halves_from": "random split (seed 0)",
    "reference": "each half's reconstruction from the input poses", "mask": "soft sphere, 128.0 Å diameter",
    "input_resolution_ang": 16.0, "resolution_ang": 11.25, "resolution_fsc05_ang": 13.5, "final_box_px": 32, "final_pixel_ang": 4.0,
    "nyquist_ang": 8.0, "iterations": 3, "converged": True, "iterations_reused": 0, "seconds": 12.5,
    "history": [
        {"iteration": 0, "box_px": 16, "pixel_ang": 8.0, "resolution_ang": 16.0, "resolution_fsc05_ang": 16.0, "seconds": 1.0},
        {"iteration": 1, "box_px": 24, "pixel_ang": 5.3333, "resolution_ang": 12.0, "resolution_fsc05_ang": 14.0, "seconds": 4.0,
         "band_resolution_ang": 17.6, "angular_step_deg": 6.0, "search_radius_deg": 12.0, "shift_range_px": 2.0,
         "median_angle_change_deg": 2.0, "median_shift_change_ang": 2.0, "median_score": 0.5},
        {"iteration": 2, "box_px": 32, "pixel_ang": 4.0, "resolution_ang": 11.3, "resolution_fsc05_ang": 13.6, "seconds": 4.0,
         "band_resolution_ang": 13.2, "angular_step_deg": 5.0, "search_radius_deg": 10.0, "shift_range_px": 2.0,
         "median_angle_change_deg": 0.5, "median_shift_change_ang": 0.0, "median_score": 0.55},
        {"iteration": 3, "box_px": 32, "pixel_ang": 4.0, "resolution_ang": 11.25, "resolution_fsc05_ang": 13.5, "seconds": 3.5,
         "band_resolution_ang": 12.4, "angular_step_deg": 5.0, "search_radius_deg": 10.0, "shift_range_px": 2.0,
         "median_angle_change_deg": 0.0, "median_shift_change_ang": 0.0, "median_score": 0.55},
    ],
}


def _rotated(eulers_true: np.ndarray, errors_deg: np.ndarray, rng) -> np.ndarray:
    """Poses each exactly errors_deg from the true ones (a rotation about a random axis)."""
    axes = rng.normal(size=(len(errors_deg), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    off = g.rotvec_to_matrix(axes * np.radians(errors_deg)[:, None])
    return g.matrix_to_euler(g.eulers_to_matrices(eulers_true) @ off)


@pytest.fixture
def project(tmp_path):
    """PROJECT with simulated/truth.star and align/aligned.star; `add_refine(done)` writes refine/."""
    root = tmp_path / "P"
    Project.create(root, angpix=PIXEL_ANG, box=BOX, config=DeepAlignConfig())
    rng = np.random.default_rng(0)
    names = [f"{i + 1:06d}@Particles/stack.mrcs" for i in range(N)]
    eulers = g.matrix_to_euler(g.rotvec_to_matrix(rng.normal(size=(N, 3))))
    origins = rng.uniform(-8, 8, (N, 2))
    write_particles(root / "simulated" / "truth.star", make_table(names, eulers, origins, PIXEL_ANG, BOX))
    aligned = _rotated(eulers, np.full(N, ALIGNED_ERROR_DEG), rng)
    write_particles(root / "align" / "aligned.star", make_table(names, aligned, origins, PIXEL_ANG, BOX))
    refined = _rotated(eulers, REFINED_ERRORS_DEG, rng)
    shifted = origins + REFINED_SHIFT_ERROR_PX * PIXEL_ANG * np.array([0.6, 0.8])

    def add_refine(done: bool = True, summary: dict = SUMMARY) -> None:
        out = root / "refine"
        extra = {"rlnRandomSubset": 1 + np.arange(N) % 2, "rlnDeepAlignRefineScore": np.full(N, 0.5)}
        write_particles(out / "refined.star", make_table(names, refined, shifted, PIXEL_ANG, BOX, extra_columns=extra))
        write_map(out / "map.mrc", np.zeros((BOX,) * 3, np.float32), PIXEL_ANG)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if done:
            Project.open(root).mark_done("refine", outputs=[out / "refined.star", out / "summary.json"], seconds=summary["seconds"],
                                         n_particles=N, resolution_ang=summary["resolution_ang"], iterations=summary["iterations"])

    return root, add_refine


def _report(root, *args):
    res = CliRunner().invoke(app, ["report", str(root), *map(str, args)])
    assert res.exit_code == 0, res.output
    return json.loads((root / "report" / "report.json").read_text()), (root / "report" / "report.md").read_text()


def test_finished_refine_adds_the_refined_set_and_leaves_the_rest_as_it_was(project):
    root, add_refine = project
    before, md_before = _report(root)
    assert "refine" not in before and set(before["align"]) == {"align"} and "## refine" not in md_before
    assert before["align"]["align"]["median_deg"] == pytest.approx(ALIGNED_ERROR_DEG, abs=1e-3)

    add_refine(done=False)  # outputs of a refine that did not finish (e.g. a --force rerun that failed): ignored
    unfinished, md_unfinished = _report(root)
    assert unfinished == before and md_unfinished == md_before

    add_refine(done=True)
    after, md = _report(root)
    r = after["refine"]
    assert {k: r[k] for k in ("n_particles", "half_sizes", "input_resolution_ang", "resolution_ang", "resolution_fsc05_ang",
                              "iterations", "converged", "seconds", "final_box_px", "nyquist_ang", "from")} == \
        {k: SUMMARY[k] for k in ("n_particles", "half_sizes", "input_resolution_ang", "resolution_ang", "resolution_fsc05_ang",
                                 "iterations", "converged", "seconds", "final_box_px", "nyquist_ang", "from")}
    assert r["input_resolution_at_nyquist"] is True and r["input_box_px"] == 16  # 16 Å = Nyquist of iteration 0's 8 Å pixel
    # the refined poses against the truth, with the report's own metrics
    t = r["vs_truth"]
    assert t["n"] == N and t["median_deg"] == pytest.approx(1.0, abs=1e-3) and t["p90_deg"] == pytest.approx(3.3, abs=1e-3)  # np.percentile interpolates: 3 + 0.1·3
    assert (t["within_2_pct"], t["within_5_pct"], t["within_10_pct"]) == (60.0, 90.0, 100.0)
    assert t["median_shift_error_px"] == pytest.approx(REFINED_SHIFT_ERROR_PX, abs=1e-3)
    assert after["align"]["refine"] == {k: v for k, v in t.items() if k != "within_2_pct"}
    # everything else as before
    assert after["align"]["align"] == before["align"]["align"]
    rest = ("refine", "align", "stages", "total_seconds")
    assert {k: v for k, v in after.items() if k not in rest} == {k: v for k, v in before.items() if k not in rest}
    assert {k: v for k, v in after["stages"].items() if k != "refine"} == before["stages"]
    assert after["stages"]["refine"] == {"seconds": SUMMARY["seconds"], "done": True}
    assert after["total_seconds"] == pytest.approx(before["total_seconds"] + SUMMARY["seconds"])
    row = "| refine | 100 | 1.00 | 3.30 | 90.0 % | 100.0 % | 0.50 |\n"  # the refined set's row in the error table
    head, section = md.split("## time per stage")[0].split("## refine")
    assert row in head and head.replace(row, "") == md_before.split("## time per stage")[0]  # the other sections are untouched
    for text in ("| particles | 100 (halves 50 / 50) |", "16.00 Å (Nyquist of the 16 px working box", "→ 11.25 Å |",
                 "| resolution, FSC 0.5 | 13.50 Å |", "| iterations | 3 (converged) |", "| seconds | 12.5 |",
                 "median 1.00°", "≤ 2° 60.0 %, ≤ 5° 90.0 %, ≤ 10° 100.0 %", "/data/P/align/aligned.star"):
        assert text in section, text
    assert (root / "report" / "errors.png").stat().st_size > 1000


def test_refine_without_truth_reports_resolution_and_timing_only(project):
    root, add_refine = project
    (root / "simulated" / "truth.star").unlink()
    shutil.rmtree(root / "align")
    summary = {**SUMMARY, "input_resolution_ang": 20.0, "converged": False,  # input resolution below iteration 0's Nyquist
               "written_iteration": 2}  # the iteration before a global pass was the finer
    add_refine(summary=summary)
    rep, md = _report(root)
    assert "align" not in rep and "vs_truth" not in rep["refine"]
    assert rep["refine"]["input_resolution_at_nyquist"] is False
    assert "| resolution, FSC 0.143: input poses → refined | 20.00 Å → 11.25 Å |" in md
    assert ("| iterations | 3 (stopped at the iteration limit); iteration 2 written (finer than the last, after a global pass) |" in md
            and "angular error" not in md)
    assert not (root / "report" / "errors.png").exists()
