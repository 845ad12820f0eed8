"""Two SLURM-style shard processes started at the same moment on one project never clobber each
other: every region/shard file is whole, project.yaml stays valid and records both shards, and
the --merge job succeeds. Same project and tiny config as tests/test_interrupt_resume.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import WIDE_TERMINAL, relocate_project, run_deepalign
from deepalign_cli.io import checkpoints as ckpt
from deepalign_cli.io import star
from test_interrupt_resume import N_REGIONS, TINY, write_predictions

pytestmark = pytest.mark.slow  # concurrent CLI shards: `make test-slow`

SHARDS = ("0-5", "6-11")
TIMEOUT_S = 300


def run_together(*commands) -> list[subprocess.CompletedProcess]:
    """Start every command at once (fresh interpreters), wait for all."""
    env = {**os.environ, "COLUMNS": WIDE_TERMINAL}
    env.setdefault("JAX_PLATFORMS", "cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "deepalign_cli.main", *map(str, c)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    out = []
    for c, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=TIMEOUT_S)
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


@pytest.fixture(scope="module")
def tiny_labelled(tmp_path_factory, sim_project_original):
    root = tmp_path_factory.mktemp("concurrency")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    p = relocate_project(sim_project_original, root / "P")
    run_deepalign("label", p, "--subset", p / "simulated" / "subset.star", "--config", cfg, check=True)
    return p, cfg


@pytest.fixture
def tiny_project(tmp_path, tiny_labelled):
    """A fresh copy of the labelled tiny project."""
    p, cfg = tiny_labelled
    return relocate_project(p, tmp_path / "P"), cfg


def test_two_train_shards_at_once_then_merge(tiny_project):
    p, cfg = tiny_project
    results = run_together(*[("train", p, "--config", cfg, "--epochs", 1, "--regions", s) for s in SHARDS])
    for r in results:
        assert r.returncode == 0, r.stderr
    for region in range(N_REGIONS):
        assert "params" in ckpt.read_entry(ckpt.region_file(p / "train", region))
    state = yaml.safe_load((p / "project.yaml").read_text())
    assert set(SHARDS) <= set(state["stages"]["train"]["shards_done"])
    assert not list(p.rglob("*.tmp*"))
    run_deepalign("train", p, "--config", cfg, "--epochs", 1, "--merge", check=True)
    state = yaml.safe_load((p / "project.yaml").read_text())
    assert state["stages"]["train"]["done"] and set(SHARDS) <= set(state["stages"]["train"]["shards_done"])


def test_two_align_shards_at_once_then_merge(tiny_project):
    p, cfg = tiny_project
    write_predictions(p)
    ref = ("--reference", p / "simulated" / "map.mrc")
    results = run_together(*[("align", p, "--config", cfg, *ref, "--regions", s) for s in SHARDS])
    for r in results:
        assert r.returncode == 0, r.stderr
    pred = star.read_particles(p / "predict" / "predictions.star").particles
    n = 0
    for s in SHARDS:
        shard = star.read_particles(p / "align" / "shards" / f"aligned_{s}.star").particles
        lo, hi = map(int, s.split("-"))
        assert set(shard["rlnImageName"]) == set(pred.loc[pred["rlnDeepAlignRegion1"].between(lo, hi), "rlnImageName"])
        n += len(shard)
    assert n == len(pred)
    yaml.safe_load((p / "project.yaml").read_text())
    assert not list(p.rglob("*.tmp*"))
    assert not list((p / "align").rglob("chunk_*.npz"))  # each shard removed its own partial results
    run_deepalign("align", p, "--config", cfg, *ref, "--merge", check=True)
    merged = star.read_particles(p / "align" / "aligned.star").particles
    assert len(merged) == n and merged["rlnImageName"].is_unique
