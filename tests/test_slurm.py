"""SLURM sharding: every region in exactly one shard; shards run in sequence + merge == one run."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepalign_cli.commands.slurm import shard_regions
from deepalign_cli.io import checkpoints as ckpt
from deepalign_cli.regionspec import format_regions, parse_regions

DA = [sys.executable, "-m", "deepalign_cli.main"]

TINY = """
regions: {spacing_deg: 60, symmetry: C1}
preprocess: {target_resolution_ang: 60}
train: {epochs: 2, images_per_region: 64, batch_size: 32, early_stopping_patience: 0}
"""


def run(*args, cwd=None):
    r = subprocess.run([*DA, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("n,shards", [(42, 8), (42, 1), (7, 8), (92, 5)])
def test_every_region_is_in_exactly_one_shard(n, shards):
    groups = shard_regions(n, shards)
    flat = [r for g in groups for r in g]
    assert sorted(flat) == list(range(n)) and len(flat) == n
    assert all(g for g in groups) and len(groups) == min(n, shards)
    # the --regions strings written into the scripts parse back to the same groups
    assert [parse_regions(format_regions(g), n) for g in groups] == groups


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    p = root / "P"
    run("simulate", p, "--n-particles", 240, "--box", 32, "--pre-aligned-fraction", 0.5, "--seed", 3)
    run("label", p, "--subset", p / "simulated" / "subset.star", "--config", cfg)
    return root, p, cfg


@pytest.mark.slow
def test_scripts_cover_all_regions_and_sharded_training_equals_one_run(tiny_project, tmp_path):
    root, p, cfg = tiny_project
    run("slurm", p, "--stage", "train", "--shards", 3, "--partition", "gpu", "--gres", "gpu:1", "--config", cfg)
    sl = p / "slurm"
    array = (sl / "train_array.sh").read_text()
    assert "#SBATCH --array=0-2" in array and "#SBATCH --gres=gpu:1" in array and "#SBATCH --partition=gpu" in array
    specs = (sl / "shards_train.txt").read_text().split()
    regions = sorted(r for s in specs for r in parse_regions(s, 12))
    assert regions == list(range(12))
    assert "--dependency=afterok" in (sl / "submit_train.sh").read_text()
    assert "--merge" in (sl / "train_merge.sh").read_text()

    # run the shards locally one after the other (as the array would), then the merge job
    for s in specs:
        run("train", p, "--config", cfg, "--regions", s)
    run("train", p, "--config", cfg, "--merge")
    # one uninterrupted run in a copy of the labelled project
    import shutil

    q = tmp_path / "Q"
    shutil.copytree(p, q, ignore=shutil.ignore_patterns("train", "slurm"))
    # the copy's project.yaml still says train is not done (train/ was not copied, record may be)
    run("train", q, "--config", cfg, "--force")
    for r in range(12):
        a = ckpt.read_entry(ckpt.region_file(p / "train", r))
        b = ckpt.read_entry(ckpt.region_file(q / "train", r))
        la = [np.asarray(x) for x in _leaves(a["params"])]
        lb = [np.asarray(x) for x in _leaves(b["params"])]
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(x, y)
        assert a["history"] == b["history"]
    assert (p / "train" / "metrics.json").exists() and (p / "train" / "curves.png").exists()


@pytest.mark.slow
def test_merge_refuses_missing_regions(tiny_project, tmp_path):
    import shutil

    root, p, cfg = tiny_project
    q = tmp_path / "R"
    shutil.copytree(p, q, ignore=shutil.ignore_patterns("train", "slurm"))
    run("train", q, "--config", cfg, "--regions", "0-3")
    r = subprocess.run([*DA, "train", str(q), "--config", str(cfg), "--merge"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "4-11" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _leaves(tree):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k])
    elif isinstance(tree, list):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree
