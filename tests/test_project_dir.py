"""The project directory: project.yaml, stage records, --force, and locked concurrent updates."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepalign_cli.config import DeepAlignConfig, TrainConfig
from deepalign_cli.errors import DeepAlignError
from deepalign_cli.io.project import Project

ORACLE = Path("/work/shared/data/relion_project_oracle")


def test_open_non_project_is_one_line_error(tmp_path):
    with pytest.raises(DeepAlignError, match=r"not a deepalign project \(no project.yaml\); run deepalign init or simulate first"):
        Project.open(tmp_path)


def test_create_records_absolute_star_pixel_and_box(tmp_path):
    Project.create(tmp_path / "proj", ORACLE / "rln_proj_64_shifted.star", config=DeepAlignConfig())
    proj = Project.open(tmp_path / "proj")
    assert proj.particles_star == (ORACLE / "rln_proj_64_shifted.star").resolve()
    assert proj.pixel_size_ang == 1.0 and proj.box_px == 64
    state = yaml.safe_load((tmp_path / "proj" / "project.yaml").read_text())
    assert state["config"]["train"]["epochs"] == DeepAlignConfig().train.epochs
    assert state["stages"] == {}


def test_create_without_pixel_size_asks_for_angpix(tmp_path):
    with pytest.raises(DeepAlignError, match=r"rln_proj_64.star: no pixel size .*pass --angpix"):
        Project.create(tmp_path / "p", ORACLE / "rln_proj_64.star")
    proj = Project.create(tmp_path / "p", ORACLE / "rln_proj_64.star", angpix=5.0)
    assert proj.pixel_size_ang == 5.0 and proj.box_px == 64  # box from the stack header


def test_create_on_a_project_of_another_star_refuses(tmp_path):
    Project.create(tmp_path, ORACLE / "rln_proj_64_shifted.star")
    with pytest.raises(DeepAlignError, match="already a deepalign project"):
        Project.create(tmp_path, ORACLE / "rln_proj_64_centered.star")


def test_mark_done_then_require_checks(tmp_path):
    proj = Project.create(tmp_path)
    with pytest.raises(DeepAlignError, match=r"run deepalign label first"):
        proj.require_done("label")
    out = proj.stage_dir("label") / "labels.star"
    out.write_text("x")
    proj.mark_done("label", outputs=[out], seconds=1.23456, config=TrainConfig(epochs=3))
    proj.require_done("label")
    record = Project.open(tmp_path).stage("label")
    assert record["done"] is True and record["seconds"] == 1.235
    assert record["outputs"] == ["label/labels.star"] and record["finished_at"]
    assert proj.stage_config("label")["epochs"] == 3


def test_require_not_done_refuses_without_force_and_resets_with_it(tmp_path):
    proj = Project.create(tmp_path)
    proj.require_not_done("train", force=False)  # never ran: fine
    proj.mark_done("train", outputs=[], seconds=2.0)
    with pytest.raises(DeepAlignError, match=r"stage 'train' already done; use --force to redo"):
        proj.require_not_done("train", force=False)
    proj.require_not_done("train", force=True)
    assert not proj.is_done("train")


def test_mark_done_keeps_shards_recorded_after_the_caller_read_them(tmp_path):
    """The interleaving two train shards finishing together produced: B records its shard, A
    records its own, A marks the stage done, then B marks it done with the list it read before
    A's entry. Both shards stay recorded."""
    proj = Project.create(tmp_path)
    proj.update_stage("train", shards_done=["6-11"])  # B
    proj.update_stage("train", shards_done=["0-5", "6-11"])  # A
    proj.mark_done("train", outputs=[], seconds=1.0, shards_done=["0-5", "6-11"])  # A
    proj.mark_done("train", outputs=[], seconds=1.0, shards_done=["6-11"])  # B, stale list
    record = Project.open(tmp_path).stage("train")
    assert record["done"] is True and record["shards_done"] == ["0-5", "6-11"]
    proj.require_not_done("train", force=True)  # a forced rerun starts from no shards
    proj.mark_done("train", outputs=[], seconds=1.0, shards_done=["0-11"])
    assert Project.open(tmp_path).stage("train")["shards_done"] == ["0-11"]


SHARD = """
import sys
from deepalign_cli.io.project import Project
proj = Project.open(sys.argv[1])
for i in range(int(sys.argv[3])):
    proj.update_stage("train", **{f"shard{sys.argv[2]}_{i}": True})
"""


def test_concurrent_updates_do_not_clobber_each_other(tmp_path):
    Project.create(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", SHARD, str(tmp_path), str(s), "15"]) for s in range(3)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    record = Project.open(tmp_path).stage("train")
    assert sum(k.startswith("shard") for k in record) == 45
    assert record["done"] is False
