"""End to end: every stage of the pipeline on simulated data, final accuracy asserted against the truth.

Small on purpose (CPU, a few minutes): 1,500 particles at 32 px (10.2 Å/px, CTF, SNR 1), 40 %
pre-aligned, 12 regions (60° spacing), worked at 16 px (60 Å target). Thresholds:

* Region hit rate: chance for the true region to be among the top 2 of 12 is 2/12 = 0.17. We
  require MIN_TOP2 (1.8× chance, ≥ 10 binomial σ above it; the run is deterministic on CPU and measured 0.38).
* Alignment: inside the right region the search is accurate (test_search.py: median ≈ 1–3° at
  SNR 0.1), so particles whose true region is in the top 2 should land within 10°; particles whose
  region was missed cannot. We require the fraction within 10° to be at least MIN_ALIGN_GIVEN_HIT
  of the top-2 hit rate, and above chance by the same margin.
* Consensus of restricted and exhaustive search keeps particles where both agree within 10°; the
  kept set must be more accurate than the whole set.
"""

import json

import numpy as np
import pytest

from conftest import run_deepalign

CONFIG = """
simulate: {n_particles: 1500, box_px: 32, snr: 1.0, pre_aligned_fraction: 0.4, seed: 0}
regions: {spacing_deg: 60, symmetry: C1}
preprocess: {target_resolution_ang: 60.0}
train: {epochs: 10, images_per_region: 3072, early_stopping_patience: 3}
predict: {top_k: 2}
align: {angular_step_deg: 15, max_shift_px: 3}
"""
MIN_TOP2 = 0.30  # ≥ 1.8× chance (2/12 = 0.167); binomial σ on 900 held-out particles ≈ 0.013, measured 0.38
MIN_ALIGN_GIVEN_HIT = 0.7


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = root / "e2e.yaml"
    cfg.write_text(CONFIG)
    p = root / "P"
    steps = [
        ["simulate", p],
        ["label", p, "--subset", p / "simulated" / "subset.star"],
        ["train", p],
        ["predict", p],
        ["reconstruct", p, "--from", p / "label" / "labels.star", "--out", "reference"],
        ["align", p],
        ["reconstruct", p],
        ["align", p, "--exhaustive"],
        ["consensus", p / "align" / "aligned.star", p / "align_exhaustive" / "aligned.star", "--threshold", "10", "--project", p],
        ["report", p],
    ]
    for s in steps:
        run_deepalign(*s, "--config", cfg, check=True) if s[0] not in ("consensus", "report") else run_deepalign(*s, check=True)
    return p, json.loads((p / "report" / "report.json").read_text())


def test_predict_finds_the_true_region_well_above_chance(pipeline):
    _, rep = pipeline
    top2 = rep["predict"]["hit_rate"]["2"]
    assert top2 >= MIN_TOP2, f"top-2 hit rate {top2:.3f} (chance {2 / 12:.3f})"
    assert rep["predict"]["hit_rate"]["1"] > 1.5 / 12


def test_alignment_is_accurate_where_the_region_was_found(pipeline):
    _, rep = pipeline
    top2 = rep["predict"]["hit_rate"]["2"]
    a = rep["align"]["align"]
    assert a["within_10_pct"] / 100 >= MIN_ALIGN_GIVEN_HIT * top2, (a, top2)
    ex = rep["align"]["align --exhaustive"]
    assert ex["within_10_pct"] >= a["within_10_pct"] - 5  # the whole-sphere search is the upper bound


def test_consensus_subset_is_more_accurate_and_maps_are_written(pipeline):
    p, rep = pipeline
    assert rep["align"]["consensus"]["within_10_pct"] > rep["align"]["align"]["within_10_pct"]
    s = rep["reconstruct"]["aligned"]
    assert np.isfinite(s["resolution_ang"]) and s["n_particles"] == 1500
    for png in ("label/regions.png", "train/curves.png", "predict/top1_prob.png", "align/scores.png", "align/angles.png",
                "reconstruct/aligned/fsc.png", "consensus/differences.png", "report/errors.png"):
        assert (p / png).stat().st_size > 1000, png


def test_flat_cumulative_rule_warns_and_align_searches_those_particles_whole(pipeline, tmp_path):
    """A cumulative-probability rule that keeps most regions says the nets are not sure: predict
    warns, and align searches the particles whose kept regions cost as much as the asymmetric
    unit over the whole unit (same result as --exhaustive for them)."""
    import shutil

    p = tmp_path / "P"
    shutil.copytree(pipeline[0], p)
    cfg = pipeline[0].parent / "e2e.yaml"
    sharp = run_deepalign("predict", p, "--config", cfg, "--cumulative-p", "0.3", "--force", check=True)
    assert "flat probabilities" not in sharp.stderr
    flat = run_deepalign("predict", p, "--config", cfg, "--cumulative-p", "0.9999", "--force", check=True)
    assert "warning: flat probabilities: --cumulative-p 0.9999 keeps" in " ".join(flat.stderr.split())
    run_deepalign("align", p, "--config", cfg, "--force", check=True)
    summary = json.loads((p / "align" / "summary.json").read_text())
    assert summary["mean_candidate_regions"] > 3 and summary["whole_unit_particles"] > 0.5 * summary["n_particles"]
