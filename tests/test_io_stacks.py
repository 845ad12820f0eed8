"""`check_stacks`: every stack a particle table names is checked from its header, and the error
names the table and its first failing particle (table order), in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deepalign_cli.errors import DeepAlignError
from deepalign_cli.io import mrc, star
from deepalign_cli.io.stacks import check_stacks

BOX_PX = 16
N_IMAGES = 5
PIXEL_ANG = 2.0


def _stack(path: Path, n: int = N_IMAGES, box: int = BOX_PX) -> Path:
    mrc.write_stack(path, np.zeros((n, box, box), np.float32), PIXEL_ANG)
    return path


def _table(folder: Path, names: list[str], image_size: int | None = BOX_PX) -> star.ParticleTable:
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [PIXEL_ANG]})
    if image_size is not None:
        optics["rlnImageSize"] = [image_size]
    particles = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": 1})
    return star.ParticleTable(particles, optics, folder / "particles.star")


def _error(table: star.ParticleTable, box_px: int | None = BOX_PX) -> str:
    with pytest.raises(DeepAlignError) as e:
        check_stacks(table, box_px)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_readable_stacks_pass_with_relative_absolute_and_dot_names(tmp_path):
    _stack(tmp_path / "a.mrcs")
    b = _stack(tmp_path / "b.mrc")
    check_stacks(_table(tmp_path, ["1@a.mrcs", "5@./a.mrcs", f"2@{b}", "3@./b.mrc"]), BOX_PX)


def test_a_missing_stack_names_the_first_particle_that_uses_it(tmp_path):
    _stack(tmp_path / "a.mrcs")
    msg = _error(_table(tmp_path, ["1@a.mrcs", "2@a.mrcs", "1@./batch_0_restacked.mrc", "2@./batch_0_restacked.mrc"]))
    assert msg == (f"{tmp_path / 'particles.star'}: particle 3 (1@./batch_0_restacked.mrc): "
                   f"stack not found ({tmp_path / 'batch_0_restacked.mrc'})")


def test_the_first_failing_particle_wins_across_stacks(tmp_path):
    _stack(tmp_path / "a.mrcs")
    _stack(tmp_path / "b.mrcs", box=2 * BOX_PX)  # first used at row 3
    msg = _error(_table(tmp_path, ["1@a.mrcs", "2@a.mrcs", "1@b.mrcs", "9@a.mrcs"]))  # b's box fails before a's index 9
    assert "particle 3 (1@b.mrcs)" in msg and f"holds {2 * BOX_PX} px images but rlnImageSize is {BOX_PX}" in msg
    msg = _error(_table(tmp_path, ["1@a.mrcs", "9@a.mrcs", "1@b.mrcs"]))
    assert f"particle 2 (9@a.mrcs): image 9 requested but {tmp_path / 'a.mrcs'} holds {N_IMAGES}" in msg


def test_without_rlnImageSize_all_stacks_need_the_first_ones_box(tmp_path):
    _stack(tmp_path / "a.mrcs")
    _stack(tmp_path / "b.mrcs", box=2 * BOX_PX)
    msg = _error(_table(tmp_path, ["1@a.mrcs", "1@b.mrcs"], image_size=None), box_px=None)
    assert f"particle 2 (1@b.mrcs): {tmp_path / 'b.mrcs'} holds {2 * BOX_PX} px images but {tmp_path / 'a.mrcs'} holds {BOX_PX} px" in msg


def test_a_file_that_is_not_mrc_and_a_bad_name_are_one_line_errors(tmp_path):
    (tmp_path / "junk.mrcs").write_bytes(bytes(range(256)) * 8)
    _stack(tmp_path / "a.mrcs")
    assert "particle 2 (1@junk.mrcs)" in _error(_table(tmp_path, ["1@a.mrcs", "1@junk.mrcs"]))
    msg = _error(_table(tmp_path, ["1@a.mrcs", "x@a.mrcs", "1@missing.mrcs"]))
    assert msg.endswith("particle 2 (x@a.mrcs): image name is not 'index@stack'")
