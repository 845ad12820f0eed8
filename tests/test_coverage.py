"""Calibrated coverage (`core/coverage.py`, `predict --coverage`): split conformal choice of the
cumulative rule's p.

The guarantee is statistical: over draws of calibration and test particles from one
distribution, the true region is kept for ≥ c of test particles on average. The tests draw
particles from a known model (probabilities from a Dirichlet, the true region drawn from them,
or from a mis-calibrated classifier whose confident choice is often wrong) and check the held-out
coverage over many repetitions, with margins of several binomial σ.
"""

import json
import math

import numpy as np
import pytest
import starfile
import yaml

from deepalign_cli.core import coverage
from deepalign_cli.errors import DeepAlignError

R = 12


def _particles(rng, n: int, confident_wrong: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(probs (n, R), true region (n,)): probabilities of sigmoid-like nets (not summing to 1);
    the true region drawn from the normalised probabilities, or, for a share `confident_wrong`,
    uniformly — a net sure of a region that is often not the particle's."""
    p = rng.dirichlet(np.full(R, 0.3), size=n) * rng.uniform(0.5, 2.0, (n, 1))
    p = np.clip(p, 0, 1)
    q = p / p.sum(axis=1, keepdims=True)
    true = np.array([rng.choice(R, p=row) for row in q])
    wrong = rng.random(n) < confident_wrong
    true[wrong] = rng.integers(0, R, wrong.sum())
    return p.astype(np.float32), true


def _kept(probs, true, p) -> np.ndarray:
    keep = coverage.top_k_regions(probs, cumulative_p=p)
    return np.array([t in k for t, k in zip(true, keep)])


def test_score_is_the_smallest_p_that_keeps_the_true_region():
    probs = np.array([[0.1, 0.6, 0.3, 0.0], [0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2]])
    true = np.array([2, 1, 3])
    s = coverage.scores(probs, true)
    np.testing.assert_allclose(s, [0.6, 0.5, 0.75], atol=1e-9)  # ties keep the stable order; shares of the row total
    for i in range(len(true)):
        assert _kept(probs[i:i + 1], true[i:i + 1], s[i])[0]
        assert not _kept(probs[i:i + 1], true[i:i + 1], s[i] - 1e-9)[0]
    assert coverage.scores(probs[:1], np.array([1]))[0] < 1e-9  # the top region: kept by any p
    # a true region with no probability at all: kept only by keeping everything
    s0 = coverage.scores(np.array([[0.7, 0.3, 0.0]]), np.array([2]))[0]
    assert s0 > 1 and _kept(np.array([[0.7, 0.3, 0.0]]), np.array([2]), s0)[0]


def test_calibrated_p_is_the_conformal_quantile_and_refuses_too_few():
    s = np.arange(1, 20) / 20.0  # 19 scores
    assert coverage.min_held_out(0.95) == 19 and coverage.min_held_out(0.9) == 9
    assert coverage.calibrated_p(s, 0.95) == pytest.approx(0.95)  # rank ⌈20 · 0.95⌉ = 19: the largest
    assert coverage.calibrated_p(s[:18], 0.95) == math.inf  # 18 < 19: every region
    assert coverage.calibrated_p(s, 0.5) == pytest.approx(0.5)  # rank ⌈20 · 0.5⌉ = 10
    for c in (0.8, 0.9, 0.95, 0.99, 0.999):  # exactly min_held_out scores suffice, one fewer does not
        n = coverage.min_held_out(c)
        assert np.isfinite(coverage.calibrated_p(np.linspace(0, 1, n), c)) and coverage.calibrated_p(np.linspace(0, 1, n - 1), c) == math.inf
    with pytest.raises(DeepAlignError, match="between 0 and 1"):
        coverage.calibrated_p(s, 1.0)


@pytest.mark.parametrize("confident_wrong", [0.0, 0.4])
@pytest.mark.parametrize("target", [0.8, 0.95])
def test_held_out_coverage_meets_the_target_for_good_and_confidently_wrong_nets(confident_wrong, target):
    rng = np.random.default_rng(1)
    got, sizes = [], []
    for _ in range(40):
        p_cal, t_cal = _particles(rng, 200, confident_wrong)
        p_new, t_new = _particles(rng, 400, confident_wrong)
        p = coverage.calibrated_p(coverage.scores(p_cal, t_cal), target)
        got.append(_kept(p_new, t_new, p).mean())
        sizes.append(np.mean([len(k) for k in coverage.top_k_regions(p_new, cumulative_p=p)]))
    # mean over 40 × 400 test particles: σ ≈ 0.006 (binomial) + the calibration sets' spread
    assert np.mean(got) >= target - 0.01, (np.mean(got), target)
    assert np.mean(got) <= target + 0.04  # not trivially by keeping everything
    # a fixed top-2 rule on the confidently wrong nets drops the true region far more often
    if confident_wrong:
        p_new, t_new = _particles(rng, 4000, confident_wrong)
        top2 = np.mean([t in k for t, k in zip(t_new, coverage.top_k_regions(p_new, k=2))])
        assert top2 < target - 0.1 and np.mean(sizes) > 2


def test_nets_at_chance_keep_nearly_every_region():
    rng = np.random.default_rng(2)
    probs = rng.uniform(0.4, 0.6, (300, R)).astype(np.float32)
    true = rng.integers(0, R, 300)
    p = coverage.calibrated_p(coverage.scores(probs[:150], true[:150]), 0.95)
    kept = [len(k) for k in coverage.top_k_regions(probs[150:], cumulative_p=p)]
    assert np.mean(kept) > 0.85 * R


def test_curve_matches_the_rule():
    rng = np.random.default_rng(3)
    probs, true = _particles(rng, 100)
    ps = [0.2, 0.5, 0.9]
    hit, mean_k = coverage.curve(probs, true, ps)
    for p, h, m in zip(ps, hit, mean_k):
        keep = coverage.top_k_regions(probs, cumulative_p=p)
        assert h == pytest.approx(_kept(probs, true, p).mean()) and m == pytest.approx(np.mean([len(k) for k in keep]))
    assert np.all(np.diff(hit) >= 0) and np.all(np.diff(mean_k) >= 0)


# labels only: these tests need regions skipped for lack of labelled particles, and with synthetic
# examples (the polar trunk's default) every region trains
TINY = ("train: {model: polar_trunk, synthetic_fraction: 0, epochs: 1, images_per_region: 64, batch_size: 16, min_positives: 1,"
        " conv_filters: [4, 8, 8], dense_units: 16, validation_fraction: %s}\n")


@pytest.mark.slow
def test_cli_without_enough_held_out_particles_keeps_every_region_and_says_so(sim_project_labelled, run_cli, tmp_path):
    """30 labelled particles over 42 regions (0–3 each): a 20 % split per region holds out ~1,
    so no coverage can be certified and predict keeps every region (align then searches the
    whole unit) with a warning. Training without a validation split cannot calibrate at all:
    a one-line error, and the earlier predictions are left as they were."""
    p = sim_project_labelled
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY % 0.2)
    run_cli("train", p, "--config", cfg, check=True)
    r = run_cli("predict", p, "--config", cfg, "--coverage", "0.9", check=True)
    msg = " ".join(r.stderr.split())
    counts = starfile.read(p / "label" / "labels.star")["particles"]["rlnDeepAlignRegion"].value_counts()
    n_val = sum(round(0.2 * c) for c in counts)  # training's stratified split: round(0.2 · n) per region
    assert n_val < 9
    assert f"calibrated on {n_val} held-out labelled particles → every region" in msg
    assert f"warning: {n_val} held-out labelled particles cannot certify coverage 0.9 (it needs ≥ 9)" in msg
    regions = starfile.read(p / "predict" / "predictions.star")["particles"]["rlnDeepAlignRegions"]
    assert all(len(str(v).split(",")) == 42 for v in regions)
    cal = json.loads((p / "predict" / "calibration.json").read_text())
    assert cal["n_held_out"] == n_val and cal["cumulative_p"] is None and cal["mean_regions_kept"] == 42

    before = (p / "predict" / "predictions.star").read_bytes()
    # the train stage records a digest of its held-out particles; predict calibrates on the same ones or refuses
    state = yaml.safe_load((p / "project.yaml").read_text())
    assert state["stages"]["train"]["validation_particles"] == n_val
    state["stages"]["train"]["validation_sha256"] = "0" * 64
    (p / "project.yaml").write_text(yaml.safe_dump(state))
    r = run_cli("predict", p, "--config", cfg, "--coverage", "0.9", "--force")
    assert r.returncode != 0 and "the labelled particles held out of training are not those the train stage recorded" in r.stderr
    assert (p / "predict" / "predictions.star").read_bytes() == before

    cfg.write_text(TINY % 0)
    run_cli("train", p, "--config", cfg, "--force", check=True)
    r = run_cli("predict", p, "--config", cfg, "--coverage", "0.9", "--force")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].endswith("training held out no labelled particles (validation_fraction 0); "
                                                     "use --top-k or --cumulative-p, or train with a validation split")
    assert "labels.star" in r.stderr
    assert (p / "predict" / "predictions.star").read_bytes() == before


def test_calibrate_reports_the_chosen_point_on_its_curve():
    rng = np.random.default_rng(4)
    probs, true = _particles(rng, 200)
    c = coverage.calibrate(probs, true, 0.9)
    assert c["cumulative_p"] == c["p"] == coverage.calibrated_p(coverage.scores(probs, true), 0.9)
    assert c["held_out_kept_at_p"] >= 0.9 and c["n_held_out"] == 200  # in-sample coverage at the conformal quantile
    i = np.searchsorted(c["curve"]["p"], c["p"])
    assert c["curve"]["p"][i] == c["p"] and c["curve"]["kept"][i] == c["held_out_kept_at_p"]
    empty = coverage.calibrate(np.zeros((0, R)), np.zeros(0, int), 0.9)
    assert empty["p"] == math.inf and empty["cumulative_p"] is None and empty["held_out_kept_at_p"] is None


@pytest.mark.slow
def test_cli_coverage_keeps_regions_skipped_in_training_and_counts_all_regions(sim_project_labelled, run_cli, tmp_path):
    """Regions skipped in training (too few positives) have probability 0: the nets cannot rule
    them out and the calibration covers only the trained regions, so --coverage keeps them for
    every particle, and the summary counts kept regions against all 42 (not the trained ones)."""
    p = sim_project_labelled
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("min_positives: 1", "min_positives: 2") % 0.3)
    run_cli("train", p, "--config", cfg, check=True)
    skipped = {int(r) for r, e in json.loads((p / "train" / "metrics.json").read_text())["regions"].items() if e["warning"]}
    assert 11 <= len(skipped) < 42  # the defect report's case: 11 of 42 skipped
    r = run_cli("predict", p, "--config", cfg, "--coverage", "0.5", check=True)
    msg = " ".join(r.stderr.split())
    kept = starfile.read(p / "predict" / "predictions.star")["particles"]["rlnDeepAlignRegions"]
    sets = [{int(x) for x in str(v).split(",")} for v in kept]
    assert all(skipped <= s for s in sets)
    mean_k = np.mean([len(s) for s in sets])
    assert f"{mean_k:.2f} regions kept per particle" in msg
    assert f"keeps {mean_k:.1f} of 42 regions per particle (the {len(skipped)} regions skipped in training are always kept)" in msg
