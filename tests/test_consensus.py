"""Consensus between pose sets (paper §2.5): core differences, name matching, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepalign_cli.core import geometry as g
from deepalign_cli.core.consensus import (
    BadImageName,
    DuplicateNames,
    consensus_mask,
    image_keys,
    match_by_name,
    pose_differences,
)
from deepalign_cli.core.symmetry import symmetry_operators


def _random_eulers(n, seed=0):
    rng = np.random.default_rng(seed)
    A = g.rotvec_to_matrix(rng.normal(size=(n, 3)) * 2.0)
    return g.matrix_to_euler(A)


def _rotate_each(eulers, angle_deg, seed=1):
    """Poses turned by exactly angle_deg about a random axis (right-multiplied)."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(len(eulers), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    A = g.eulers_to_matrices(eulers) @ g.rotvec_to_matrix(axes * np.deg2rad(angle_deg))
    return g.matrix_to_euler(A)


# ---------------------------------------------------------------- core


@pytest.mark.parametrize("sym", ["C4", "D7"])
def test_symmetry_equivalent_poses_agree(sym):
    ops = symmetry_operators(sym)
    e = _random_eulers(50)
    A = g.eulers_to_matrices(e)
    pick = np.arange(50) % len(ops)
    equivalent = g.matrix_to_euler(A @ ops[pick])
    assert pose_differences(e, equivalent, ops).max() < 1e-4
    assert pose_differences(e, equivalent, ops, mode="direction").max() < 1e-4
    # without the group the same poses look far apart (all but the identity-paired ones)
    c1 = symmetry_operators("C1")
    assert np.median(pose_differences(e, equivalent, c1)) > 30


def test_seven_degrees_is_cut_at_5_and_kept_at_10():
    ops = symmetry_operators("C1")
    e = _random_eulers(40)
    off = _rotate_each(e, 7.0)
    np.testing.assert_allclose(pose_differences(e, off, ops), 7.0, atol=1e-6)
    mask5, pairs = consensus_mask([e, off], ops, 5.0)
    mask10, _ = consensus_mask([e, off], ops, 10.0)
    assert not mask5.any() and mask10.all()
    assert set(pairs) == {(0, 1)}


def test_direction_mode_ignores_psi():
    ops = symmetry_operators("C1")
    e = _random_eulers(30)
    e2 = e.copy()
    e2[:, 2] += 90.0
    assert pose_differences(e, e2, ops, mode="direction").max() < 1e-4
    np.testing.assert_allclose(pose_differences(e, e2, ops, mode="rotation"), 90.0, atol=1e-6)


def test_three_inputs_must_all_agree_pairwise():
    ops = symmetry_operators("C1")
    e = _random_eulers(6)
    b = e.copy()
    c = e.copy()
    b[1] = _rotate_each(e[1:2], 8.0)[0]  # b disagrees on particle 1
    c[4] = _rotate_each(e[4:5], 20.0)[0]  # c disagrees on particle 4
    mask, pairs = consensus_mask([e, b, c], ops, 5.0)
    assert mask.tolist() == [True, False, True, True, False, True]
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    assert pairs[(1, 2)][1] == pytest.approx(8.0, abs=1e-6)


def test_large_batch_is_chunked_identically():
    ops = symmetry_operators("I1")
    e1, e2 = _random_eulers(5000, 2), _random_eulers(5000, 3)
    full = pose_differences(e1, e2, ops)
    assert full.shape == (5000,)
    np.testing.assert_allclose(full[:10], pose_differences(e1[:10], e2[:10], ops))
    # the icosahedral asymmetric unit bounds the distance well below 180°
    assert full.max() < 90


def test_names_match_across_zero_padding_and_paths():
    a = np.array(["000001@Extract/job7/a.mrcs", "000002@Extract/job7/a.mrcs", "000001@Extract/job7/b.mrcs"])
    b = np.array(["1@/data/proj/Extract/job7/b.mrcs", "2@/data/proj/Extract/job7/a.mrcs", "3@./x.mrcs"])
    common, idx, missing = match_by_name([a, b])
    assert list(common) == ["2@a.mrcs", "1@b.mrcs"]
    assert idx[0].tolist() == [1, 2] and idx[1].tolist() == [1, 0]
    assert list(missing[0]) == ["3@./x.mrcs"]
    assert list(missing[1]) == ["000001@Extract/job7/a.mrcs"]


def test_same_stack_basename_in_two_folders_uses_more_of_the_path():
    a = np.array(["1@mic1/particles.mrcs", "1@mic2/particles.mrcs"])
    b = np.array(["1@/abs/mic2/particles.mrcs", "1@/abs/mic1/particles.mrcs"])
    keys, depth = image_keys([a, b])
    assert depth == 2
    common, idx, missing = match_by_name([a, b])
    assert idx[1].tolist() == [1, 0] and all(len(m) == 0 for m in missing)


def test_duplicate_and_malformed_names_raise():
    with pytest.raises(DuplicateNames):
        match_by_name([np.array(["1@a.mrcs", "001@a.mrcs"]), np.array(["1@a.mrcs"])])
    with pytest.raises(BadImageName):
        match_by_name([np.array(["x@a.mrcs"]), np.array(["1@a.mrcs"])])


# ---------------------------------------------------------------- command

from typer.testing import CliRunner  # noqa: E402

from deepalign_cli.errors import DeepAlignError  # noqa: E402
from deepalign_cli.io.star import make_table, read_particles, write_particles  # noqa: E402
from deepalign_cli.main import app  # noqa: E402

OUTPUTS = {"consensus.star", "differences.csv", "summary.json", "differences.png", "missing.txt"}


def _write_star(path, names, eulers, extra=None):
    table = make_table(names, eulers, np.zeros((len(names), 2)), pixel_size_ang=2.0, box=24, extra_columns=extra)
    write_particles(path, table)
    return path


def _names(n, fmt="{:06d}@Extract/job7/stack.mrcs"):
    return [fmt.format(i + 1) for i in range(n)]


def _run(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert isinstance(result.exception, DeepAlignError), result.output
    msg = str(result.exception)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg


def test_command_keeps_agreeing_particles_and_reports_missing(tmp_path):
    n = 10
    e = _random_eulers(n)
    b = e.copy()
    b[:3] = _rotate_each(e[:3], 7.0)  # three particles disagree by 7°
    a_star = _write_star(tmp_path / "a.star", _names(n), e, extra={"rlnClassNumber": np.arange(n) + 1})
    # b: other path and no zero padding, last two particles absent, one particle only in b
    names_b = _names(n, "{}@/abs/Extract/job7/stack.mrcs")[:8] + ["1@other.mrcs"]
    b_star = _write_star(tmp_path / "b.star", names_b, np.vstack([b[:8], b[:1]]))
    res = _run(["consensus", a_star, b_star, "--threshold", 5, "--sym", "C1"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "consensus"
    assert {p.name for p in out.iterdir()} == OUTPUTS
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["total"], summary["kept"]) == (8, 5)
    assert summary["pairs"][0]["kept"] == 5 and summary["pairs"][0]["total"] == 8
    assert [m["count"] for m in summary["missing"]] == [1, 2]
    missing = (out / "missing.txt").read_text().splitlines()[1:]
    assert f"{a_star}\t1@other.mrcs" in missing
    assert f"{b_star}\t000009@Extract/job7/stack.mrcs" in missing and len(missing) == 3
    kept = read_particles(out / "consensus.star")
    assert list(kept.particles["rlnImageName"]) == _names(n)[3:8]
    assert list(kept.particles["rlnClassNumber"]) == [4, 5, 6, 7, 8]  # other columns kept
    np.testing.assert_allclose(kept.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), e[3:8], atol=1e-4)
    diffs = (out / "differences.csv").read_text().splitlines()
    assert diffs[0] == "rlnImageName,diff_0_1_deg,kept" and len(diffs) == 9
    assert (out / "differences.png").read_bytes()[:4] == b"\x89PNG"
    assert "5 / 8" in res.output


def test_command_threshold_10_keeps_7_degree_particles_and_keep_from_picks_poses(tmp_path):
    e = _random_eulers(6)
    b = _rotate_each(e, 7.0)
    a_star = _write_star(tmp_path / "a.star", _names(6), e)
    b_star = _write_star(tmp_path / "b.star", _names(6), b)
    out = tmp_path / "agreed"
    res = _run(["consensus", a_star, b_star, "--threshold", 10, "--keep-from", 1, "--out", out])
    assert res.exit_code == 0, res.output
    kept = read_particles(out / "consensus.star")
    assert len(kept) == 6
    np.testing.assert_allclose(kept.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), b, atol=1e-4)


def test_command_three_inputs_direction_mode_and_config(tmp_path):
    e = _random_eulers(5)
    b = e.copy()
    b[:, 2] += 40.0  # psi only: ignored in direction mode
    c = e.copy()
    c[0] = _rotate_each(e[:1], 30.0)[0]
    c[0, 2] = e[0, 2]
    stars = [_write_star(tmp_path / f"{k}.star", _names(5), x) for k, x in enumerate((e, b, c))]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("consensus:\n  threshold_deg: 5\n  mode: direction\nregions:\n  symmetry: C1\n")
    res = _run(["consensus", *stars, "--config", cfg, "--out", tmp_path / "out"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mode"] == "direction" and summary["kept"] == 4
    assert [(p["a"], p["b"], p["kept"]) for p in summary["pairs"]] == [(0, 1, 5), (0, 2, 4), (1, 2, 4)]


def test_command_symmetry_equivalent_inputs_all_kept(tmp_path):
    ops = symmetry_operators("D7")
    e = _random_eulers(12)
    eq = g.matrix_to_euler(g.eulers_to_matrices(e) @ ops[np.arange(12) % len(ops)])
    a_star = _write_star(tmp_path / "a.star", _names(12), e)
    b_star = _write_star(tmp_path / "b.star", _names(12), eq)
    res = _run(["consensus", a_star, b_star, "--sym", "d7", "--threshold", 1])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "consensus" / "summary.json").read_text())["kept"] == 12


def _empty_star(path):
    path.write_text(
        "# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 2.0\n\n"
        "# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n_rlnAngleTilt #3\n_rlnAnglePsi #4\n"
    )
    return path


@pytest.mark.parametrize("case", ["empty", "unknown_sym", "no_common", "no_angles", "one_input"])
def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, case):
    e = _random_eulers(4)
    a_star = _write_star(tmp_path / "a.star", _names(4), e)
    b_star = _write_star(tmp_path / "b.star", _names(4), e)
    args, fragments = [a_star, b_star], []
    if case == "empty":
        args, fragments = [a_star, _empty_star(tmp_path / "empty.star")], ["empty.star", "empty"]
    elif case == "unknown_sym":
        args, fragments = [a_star, b_star, "--sym", "X9"], ["--sym X9", "unknown symmetry"]
    elif case == "no_common":
        c_star = _write_star(tmp_path / "c.star", _names(4, "{}@elsewhere.mrcs"), e)
        args, fragments = [a_star, c_star], ["a.star", "no particle"]
    elif case == "no_angles":
        write_particles(tmp_path / "na.star", make_table(_names(4), None, None, pixel_size_ang=2.0, box=24))
        args, fragments = [a_star, tmp_path / "na.star"], ["na.star", "rlnAngleRot"]
    else:
        args, fragments = [a_star], ["at least two"]
    res = _run(["consensus", *args])
    _assert_one_line_error(res, *fragments)
    assert not (tmp_path / "consensus").exists()


def test_project_option_writes_to_project_and_uses_its_symmetry(tmp_path):
    from deepalign_cli.config import DeepAlignConfig
    from deepalign_cli.io.project import Project

    cfg = DeepAlignConfig()
    cfg.regions.symmetry = "C4"
    proj = Project.create(tmp_path / "proj", angpix=2.0, box=24, config=cfg)
    ops = symmetry_operators("C4")
    e = _random_eulers(8)
    eq = g.matrix_to_euler(g.eulers_to_matrices(e) @ ops[np.arange(8) % 4])
    a_star = _write_star(tmp_path / "a.star", _names(8), e)
    b_star = _write_star(tmp_path / "b.star", _names(8), eq)
    res = _run(["consensus", a_star, b_star, "--project", proj.root])
    assert res.exit_code == 0, res.output
    summary = json.loads((proj.root / "consensus" / "summary.json").read_text())
    assert summary["symmetry"] == "C4" and summary["kept"] == 8
    assert proj.is_done("consensus")


def test_failure_while_writing_leaves_no_partial_outputs(tmp_path, monkeypatch):
    import deepalign_cli.commands.consensus as cmd

    def broken_writer(path, table):
        raise DeepAlignError(f"{path}: disk full")

    monkeypatch.setattr(cmd, "write_particles", broken_writer)
    e = _random_eulers(4)
    a_star = _write_star(tmp_path / "a.star", _names(4), e)
    b_star = _write_star(tmp_path / "b.star", _names(4), e)
    res = _run(["consensus", a_star, b_star])
    _assert_one_line_error(res, "disk full")
    assert not (tmp_path / "consensus").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.star", "b.star"]


def test_xmipp_input_is_matched_with_star_input(tmp_path):
    from deepalign_cli.io.xmipp import write_xmd

    e = _random_eulers(6)
    a_star = _write_star(tmp_path / "a.star", _names(6), e)
    table = make_table(_names(6, "{}@/elsewhere/Extract/job7/stack.mrcs"), e, np.zeros((6, 2)), pixel_size_ang=2.0, box=24)
    write_xmd(tmp_path / "b.xmd", table)
    res = _run(["consensus", a_star, tmp_path / "b.xmd", "--threshold", 0.5])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "consensus" / "summary.json").read_text())["kept"] == 6
