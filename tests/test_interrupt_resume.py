"""Interrupting `train` and `align` (SIGINT / SIGTERM to the real CLI) keeps the project valid, and
`--resume` finishes with results bit-identical to an uninterrupted run (same seed, CPU).

Train is stopped with SIGINT (Ctrl-C), align with SIGTERM (a SLURM time limit); both go through
the same handler. Project: the session's simulated project (200 particles, 32 px, 30 pre-aligned) relabelled with a
tiny config (60° regions → 12, working box 16 px, 8 epochs of 2 steps per region). Each test
starts the command as a subprocess, waits until it has saved one piece of work (a resume state of
train, a finished chunk of align), sends the signal and checks: exit code 130 with the one-line
message, project.yaml parses and the stage is not done, no temporary files, every saved file is
whole. The resumed run must then reproduce the uninterrupted run exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import WIDE_TERMINAL, relocate_project, run_deepalign
from deepalign_cli.io import checkpoints as ckpt
from deepalign_cli.io import star

pytestmark = pytest.mark.slow  # real CLI runs killed and resumed: `make test-slow`

EPOCHS = 8  # resume states appear after the first epoch: 8 epochs leave most of the run for the signal (3 left ~1 s, missed once in a make test-slow)
TINY = f"""
regions: {{spacing_deg: 60, symmetry: C1}}
preprocess: {{target_resolution_ang: 60}}
train: {{epochs: {EPOCHS}, images_per_region: 64, batch_size: 32, early_stopping_patience: 0, min_positives: 1}}
align: {{angular_step_deg: 20, psi_step_deg: 20, max_shift_px: 1, refine: false, memory_budget_gb: 0.0002}}
"""
N_REGIONS = 12
POLL_S, WAIT_LIMIT_S = 0.02, 120
EXIT_INTERRUPTED = 130


def start(*args) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": WIDE_TERMINAL}
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.Popen([sys.executable, "-m", "deepalign_cli.main", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_when(proc: subprocess.Popen, ready, sig: int) -> str:
    """Send `sig` once ready() is true; return stderr after checking the exit code and message."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"finished before it could be interrupted:\n{proc.stderr.read()}"
        assert time.monotonic() - t0 < WAIT_LIMIT_S, "nothing saved in time"
        time.sleep(POLL_S)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT_LIMIT_S)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupted; rerun with --resume" in err
    return err


def assert_project_valid(project: Path, stage: str) -> None:
    state = yaml.safe_load((project / "project.yaml").read_text())
    assert isinstance(state, dict) and "stages" in state
    assert not (state["stages"].get(stage) or {}).get("done", False)
    leftovers = [p for p in project.rglob("*") if ".tmp" in p.name or ".old." in p.name]
    assert leftovers == []


def leaves(tree) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in leaves(v)]
    return [np.asarray(tree)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sim_project_original):
    """(labelled project, config): relabelled with TINY. Read-only: tests work on copies."""
    root = tmp_path_factory.mktemp("interrupt")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    p = relocate_project(sim_project_original, root / "P")
    run_deepalign("label", p, "--subset", p / "simulated" / "subset.star", "--config", cfg, check=True)
    return p, cfg


@pytest.fixture(scope="module")
def trained_reference(tmp_path_factory, tiny):
    """An uninterrupted train run on a copy of the tiny project."""
    p, cfg = tiny
    q = relocate_project(p, tmp_path_factory.mktemp("reference") / "Q")
    run_deepalign("train", q, "--config", cfg, check=True)
    return q


def test_train_stopped_by_ctrl_c_resumes_to_the_uninterrupted_result(tiny, trained_reference, tmp_path):
    p0, cfg = tiny
    p = relocate_project(p0, tmp_path / "P")
    resume_dir = p / "train" / "resume"
    proc = start("train", p, "--config", cfg)
    interrupt_when(proc, lambda: resume_dir.is_dir() and any(resume_dir.glob("region_*.msgpack")), signal.SIGINT)

    assert_project_valid(p, "train")
    saved = sorted(resume_dir.glob("region_*.msgpack"))
    assert saved
    states = {int(f.stem.split("_")[1]): ckpt.read_entry(f) for f in saved}  # whole files only
    assert all(int(s["epoch"]) < EPOCHS - 1 for s in states.values()), "interrupted after the last epoch: nothing left to resume"

    run_deepalign("train", p, "--config", cfg, "--resume", check=True)
    state = yaml.safe_load((p / "project.yaml").read_text())
    assert state["stages"]["train"]["done"]
    for r in range(N_REGIONS):
        a = ckpt.read_entry(ckpt.region_file(p / "train", r))
        b = ckpt.read_entry(ckpt.region_file(trained_reference / "train", r))
        assert a.get("best_epoch") == b.get("best_epoch")
        assert a.get("history") == b.get("history")
        la, lb = leaves(a.get("params")), leaves(b.get("params"))
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(x, y)


def test_resume_skips_finished_regions_and_refuses_other_settings(tiny, trained_reference, tmp_path):
    p0, cfg = tiny
    p = relocate_project(trained_reference, tmp_path / "P")
    # a finished region with the same settings is not retrained: its file stays byte-identical
    before = {r: ckpt.region_file(p / "train", r).read_bytes() for r in range(N_REGIONS)}
    out = run_deepalign("train", p, "--config", cfg, "--resume", check=True)
    assert "already trained" in out.stderr
    assert {r: ckpt.region_file(p / "train", r).read_bytes() for r in range(N_REGIONS)} == before
    # saved states from other settings are refused with one line, nothing changed
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("images_per_region: 64", "images_per_region: 96"))
    refused = run_deepalign("train", p, "--config", other, "--resume")
    assert refused.returncode == 1
    assert "saved with other train/preprocess settings" in refused.stderr
    assert {r: ckpt.region_file(p / "train", r).read_bytes() for r in range(N_REGIONS)} == before


def star_body(path: Path) -> str:
    """A STAR file without its comment lines (the writer stamps the time)."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#"))


def write_predictions(project: Path) -> None:
    """predictions.star as `predict` writes it (fixed 'top1,top2' per particle; align only needs a
    deterministic candidate list, so no trained nets are needed here)."""
    table = star.read_particles(project / "simulated" / "particles.star")
    df = table.particles.copy()
    top1 = np.arange(len(df)) % N_REGIONS
    df["rlnDeepAlignRegions"] = [f"{a},{(a + 1) % N_REGIONS}" for a in top1]
    df["rlnDeepAlignRegion1"] = top1
    star.write_particles(project / "predict" / "predictions.star", star.ParticleTable(df, table.optics, table.source))


@pytest.fixture(scope="module")
def aligned_reference(tmp_path_factory, tiny):
    """(project ready for align, its uninterrupted aligned.star table)."""
    p0, cfg = tiny
    p = relocate_project(p0, tmp_path_factory.mktemp("align_ref") / "P")
    write_predictions(p)
    run_deepalign("align", p, "--config", cfg, "--reference", p / "simulated" / "map.mrc", check=True)
    return p, star.read_particles(p / "align" / "aligned.star").particles


def test_align_stopped_by_sigterm_resumes_to_the_uninterrupted_star(tiny, aligned_reference, tmp_path):
    """SIGTERM (what SLURM sends at the time limit) behaves like Ctrl-C."""
    p0, cfg = tiny
    ref_project, expected = aligned_reference
    p = relocate_project(p0, tmp_path / "P")
    write_predictions(p)
    args = ("align", p, "--config", cfg, "--reference", p / "simulated" / "map.mrc")
    partial = p / "align" / ".partial"
    proc = start(*args)
    interrupt_when(proc, lambda: partial.is_dir() and any(partial.glob("*/chunk_*.npz")), signal.SIGTERM)

    assert_project_valid(p, "align")
    assert not (p / "align" / "aligned.star").exists()
    chunks = sorted(partial.glob("*/chunk_*.npz"))
    for f in chunks:  # every saved chunk is whole
        with np.load(f) as z:
            assert z["local"].shape[0] == z["score"].shape[0] > 0
    n_saved = len(chunks)

    resumed = run_deepalign(*args, "--resume", check=True)
    assert f"resume: {n_saved} of" in resumed.stderr
    got = star.read_particles(p / "align" / "aligned.star").particles
    cols = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
            "rlnDeepAlignScore", "rlnDeepAlignRegion"]
    assert got[cols].equals(expected[cols])
    assert star_body(p / "align" / "aligned.star") == star_body(ref_project / "align" / "aligned.star")
    assert not partial.exists()
