"""Bad-input catalogue: every row gives exit code ≠ 0, ONE line on stderr naming the file or option
and the problem, and leaves the working folder (project + inputs) exactly as it was.

Troubleshooting table (for the README; `P` is the project folder):

| Input | Command | Message (one line on stderr, exit code 1) |
|---|---|---|
| particle STAR that does not exist | `init P --particles missing.star` | `missing.star: file not found` |
| STAR without a pixel size (no `data_optics`/`rlnImagePixelSize`) | `init P --particles nopixel.star` | `nopixel.star: no pixel size (rlnImagePixelSize in data_optics); pass --angpix` |
| optics groups with different box sizes | `init P --particles mixed.star` | `mixed.star: optics groups have different box sizes (rlnImageSize)` |
| a binary file named `.star` | `init P --particles corrupt.star` | `corrupt.star: no data_particles loop (and no other data block) found` |
| STAR naming a stack that does not exist | `init P --particles nostack.star` | `nostack.star: particle 1 (1@./batch_0_restacked.mrc): stack not found (…/batch_0_restacked.mrc)` |
| STAR whose stack has another box than rlnImageSize | `init P --particles wrongbox.star` | `wrongbox.star: particle 1 (…): …/particles.mrcs holds 32 px images but rlnImageSize is 64` |
| STAR naming an image beyond its stack | `init P --particles beyond.star` | `beyond.star: particle 4 (000999@…/particles.mrcs): image 999 requested but …/particles.mrcs holds 200` |
| map that does not exist | `simulate P --map missing.mrc` | `missing.mrc: file not found` |
| not an MRC file | `simulate P --map garbage.mrc` | `garbage.mrc: not a valid MRC file (unsupported mode 252579084)` (or `(bad or missing header)`) |
| truncated MRC | `simulate P --map truncated.mrc` | `truncated.mrc: truncated file (8704 bytes, the header's 16×16×16 mode-2 data needs 17408)` |
| map with voxel size 0 in the header | `simulate P --map nopixel.mrc` | `nopixel.mrc: the header has no voxel size; pass --angpix` |
| map with NaN voxels | `simulate P --map nan.mrc` | `nan.mrc: map contains NaN or infinite values` |
| odd box | `simulate P --box 33` | `--box 33: RELION needs an even box` |
| project folder of another particle STAR | `simulate P` (P made by `init`) | `P: already a deepalign project for …/truth.star; simulate into a new project folder` |
| disk full / file-size limit | `simulate P` | `P/simulated/particles.mrcs: cannot create stack (File too large)` |
| folder that is not a project | `label notaproject --subset …` | `…/notaproject: not a deepalign project (no project.yaml); run deepalign init or simulate first` |
| subset STAR without angles | `label P --subset particles.star` | `particles.star: no rlnAngleRot column; label needs a pre-aligned subset with angles` |
| STAR with an empty particle loop | `label P --subset empty.star` | `empty.star: the particle table is empty` |
| NaN angles | `label P --subset nan.star` | `nan.star: angles or origins contain NaN or infinite values` |
| unknown symmetry | `label P --sym X3` | `--sym X3: unknown symmetry 'X3': use C1, Cn, Dn, T, O, I1 or I2 (RELION names)` |
| spacing that leaves 0 regions | `label P --sym I1 --spacing 60` | `--spacing 60.0: gives 0 regions in the I1 asymmetric unit; use a smaller spacing` |
| spacing out of range | `label P --spacing 0` | `command-line options: spacing_deg: Input should be greater than 0` |
| config with an unknown key | `label P --config bad.yaml` | `bad.yaml: label.min_particles: Extra inputs are not permitted` |
| config with a value of the wrong type | `label P --config bad.yaml` | `bad.yaml: label.min_particles_per_region: Input should be a valid integer, …` |
| config that is not YAML | `label P --config bad.yaml` | `bad.yaml: not valid YAML (while parsing a flow sequence)` |
| subset STAR moved away from its stacks | `label P --subset moved.star` | `moved.star: particle 1 (000001@simulated/particles.mrcs): stack not found (…)` |
| subset whose stack has another box | `label P --subset wrongbox.star` | `wrongbox.star: particle 1 (…): … holds 32 px images but rlnImageSize is 64` |
| subset naming an image beyond its stack | `label P --subset beyond.star` | `beyond.star: particle 4 (000999@…): image 999 requested but … holds 200` |
| subset of an unknown type | `label P --subset subset.txt` | `subset.txt: unknown particle file type '.txt'; expected one of .star, .cs, .xmd` |
| corrupt cryoSPARC file | `label P --subset bad.cs` | `bad.cs: not a cryoSPARC .cs file (we only support format version …)` |
| subset at another pixel size than the project | `label P --subset other_pixel.star` | `other_pixel.star: pixel size 1.5 Å differs from the project's 10.1562 Å (…); …` |
| a file where the stage folder goes | `label P` with a file `P/label` | `P/label: exists and is not a folder; move it away (…)` |
| read-only project folder (skipped as root) | `label P` | `P/label: cannot create output folder (Permission denied)` |
| empty particle file among consensus inputs | `consensus empty.star truth.star --project P` | `empty.star: the particle table is empty` |
| one consensus input | `consensus truth.star` | `truth.star: give at least two particle files to compare` |

`init` and `label` read every stack's header (io/stacks.py), so a missing stack, a stack of
another box or an index beyond a stack fails there, naming the first failing particle; the later
stages keep their own checks (rows below). Rows still to add: mixed box sizes between stacks,
pixel-size mismatch between a map and the particles.

Rows run in-process through `deepalign_cli.main.run` (the console script's function: same exit
code, same stderr), except those that change the process (a file-size limit), which run in a
fresh interpreter; `test_console_script_prints_the_same_line` checks the two agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import resource
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from conftest import WIDE_TERMINAL, run_deepalign
from deepalign_cli.io import star

MAP_BOX = 16
MAP_VOXEL_ANG = 2.0
FILE_SIZE_LIMIT_BYTES = 200_000  # below the 820 kB stack of the simulated project


@dataclasses.dataclass
class Row:
    id: str
    setup: Callable[[Path, Path], list]  # (work folder, project) → deepalign arguments
    expect: tuple[str, ...]  # substrings of the error line (file/option and problem)
    limit_file_size: bool = False  # run in a fresh interpreter with RLIMIT_FSIZE (a full disk)
    read_only_project: bool = False  # chmod 0o555 the project first


# ------------------------------------------------------------------------------------- input files


def _map(path: Path, voxel_ang: float = MAP_VOXEL_ANG, nan: bool = False) -> Path:
    vol = np.random.default_rng(0).random((MAP_BOX,) * 3, dtype=np.float32)
    if nan:
        vol[3, 4, 5] = np.nan
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as m:
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about the NaN we want
        m.set_data(vol)
        m.voxel_size = voxel_ang
    return path


def _truncated_map(path: Path) -> Path:
    data = _map(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _subset(sim: Path) -> star.ParticleTable:
    return star.read_particles(sim / "simulated" / "subset.star")


def _write(path: Path, table: star.ParticleTable) -> Path:
    star.write_particles(path, table)
    return path


def _nan_angles(ws: Path, sim: Path) -> Path:
    table = _subset(sim)
    table.particles.loc[3, "rlnAngleTilt"] = np.nan
    return _write(ws / "nan.star", table)


def _mixed_boxes(ws: Path, sim: Path) -> Path:
    table = star.read_particles(sim / "simulated" / "truth.star")
    second = table.optics.assign(rlnOpticsGroup=2, rlnOpticsGroupName="opticsGroup2", rlnImageSize=64)
    table.optics = pd.concat([table.optics, second], ignore_index=True)
    table.particles.loc[len(table) // 2 :, "rlnOpticsGroup"] = 2
    return _write(ws / "mixed.star", table)


def _no_pixel_star(ws: Path, sim: Path) -> Path:
    particles = _subset(sim).particles.drop(columns=["rlnOpticsGroup"])
    path = ws / "nopixel.star"
    starfile.write({"particles": particles}, path)
    return path


def _empty_star(ws: Path) -> Path:
    path = ws / "empty.star"
    path.write_text("data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 1.0\n\n"
                    "data_particles\n\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n")
    return path


def _with_images(path: Path, sim: Path, names=None, image_size: int | None = None, subset: bool = False) -> Path:
    """The truth STAR (or the subset) at `path`, with other image names or another rlnImageSize.
    names(i, stack) → rlnImageName of row i; stack is the absolute path of the project's stack."""
    table = _subset(sim) if subset else star.read_particles(sim / "simulated" / "truth.star")
    stack = (sim / "simulated" / "particles.mrcs").resolve()
    if names is not None:
        table.particles["rlnImageName"] = [names(i, stack) for i in range(len(table))]
    if image_size is not None:
        table.optics["rlnImageSize"] = image_size
    return _write(path, table)


def _absolute(i: int, stack: Path) -> str:
    return f"{i + 1:06d}@{stack}"


def _beyond_at_row_3(i: int, stack: Path) -> str:
    return f"000999@{stack}" if i == 3 else _absolute(i, stack)


def _text(path: Path, text: str | bytes) -> Path:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _other_project(ws: Path, sim: Path) -> Path:
    run_deepalign("init", ws / "other", "--particles", sim / "simulated" / "truth.star", check=True)
    return ws / "other"


def _label(sim: Path, *extra) -> list:
    return ["label", sim, "--subset", sim / "simulated" / "subset.star", *extra]


def _config(ws: Path, text: str) -> Path:
    return _text(ws / "bad.yaml", text)


def _label_into_a_file(ws: Path, sim: Path) -> list:
    _text(sim / "label", "a file where label/ would go")
    return _label(sim)


ROWS = [
    Row("init-missing-particle-star", lambda ws, sim: ["init", ws / "P", "--particles", ws / "missing.star"], ("missing.star", "file not found")),
    Row("init-star-without-pixel-size", lambda ws, sim: ["init", ws / "P", "--particles", _no_pixel_star(ws, sim)],
        ("nopixel.star", "no pixel size", "--angpix")),
    Row("init-mixed-box-sizes", lambda ws, sim: ["init", ws / "P", "--particles", _mixed_boxes(ws, sim)], ("mixed.star", "different box sizes")),
    Row("init-corrupt-star", lambda ws, sim: ["init", ws / "P", "--particles", _text(ws / "corrupt.star", bytes(range(256)) * 8)],
        ("corrupt.star", "no data_particles loop")),
    Row("init-stack-not-found", lambda ws, sim: ["init", ws / "P", "--particles", _with_images(ws / "nostack.star", sim, lambda i, s: f"{i + 1}@./batch_0_restacked.mrc")],
        ("nostack.star: particle 1 (1@./batch_0_restacked.mrc): stack not found", "batch_0_restacked.mrc)")),
    Row("init-stack-of-another-box", lambda ws, sim: ["init", ws / "P", "--particles", _with_images(ws / "wrongbox.star", sim, _absolute, image_size=64)],
        ("wrongbox.star: particle 1 (", "particles.mrcs holds 32 px images but rlnImageSize is 64")),
    Row("init-index-beyond-stack", lambda ws, sim: ["init", ws / "P", "--particles", _with_images(ws / "beyond.star", sim, _beyond_at_row_3)],
        ("beyond.star: particle 4 (000999@", "image 999 requested but", "particles.mrcs holds 200")),
    Row("simulate-missing-map", lambda ws, sim: ["simulate", ws / "P", "--map", ws / "missing.mrc"], ("missing.mrc", "file not found")),
    Row("simulate-corrupt-map", lambda ws, sim: ["simulate", ws / "P", "--map", _text(ws / "garbage.mrc", bytes(range(256)) * 12)],
        ("garbage.mrc", "not a valid MRC file")),
    Row("simulate-truncated-map", lambda ws, sim: ["simulate", ws / "P", "--map", _truncated_map(ws / "truncated.mrc")],
        ("truncated.mrc", "truncated file")),
    Row("simulate-map-without-voxel-size", lambda ws, sim: ["simulate", ws / "P", "--map", _map(ws / "nopixel.mrc", voxel_ang=0.0)],
        ("nopixel.mrc", "no voxel size", "--angpix")),
    Row("simulate-map-with-nan", lambda ws, sim: ["simulate", ws / "P", "--map", _map(ws / "nan.mrc", nan=True)], ("nan.mrc", "NaN")),
    Row("simulate-odd-box", lambda ws, sim: ["simulate", ws / "P", "--box", "33"], ("--box 33", "even box")),
    Row("simulate-into-project-of-another-star", lambda ws, sim: ["simulate", _other_project(ws, sim), "--n-particles", "20"],
        ("other", "already a deepalign project for", "truth.star")),
    Row("simulate-disk-full", lambda ws, sim: ["simulate", ws / "P", "--n-particles", "200", "--box", "32"],
        ("P/simulated/particles.mrcs", "File too large"), limit_file_size=True),
    Row("label-not-a-project", lambda ws, sim: ["label", ws / "notaproject", "--subset", sim / "simulated" / "subset.star"],
        ("notaproject", "not a deepalign project")),
    Row("label-star-without-angles", lambda ws, sim: ["label", sim, "--subset", sim / "simulated" / "particles.star"],
        ("particles.star", "no rlnAngleRot column")),
    Row("label-empty-star", lambda ws, sim: ["label", sim, "--subset", _empty_star(ws)], ("empty.star", "empty")),
    Row("label-nan-angles", lambda ws, sim: ["label", sim, "--subset", _nan_angles(ws, sim)], ("nan.star", "NaN")),
    Row("label-unknown-symmetry", lambda ws, sim: _label(sim, "--sym", "X3"), ("--sym X3", "unknown symmetry")),
    Row("label-spacing-gives-zero-regions", lambda ws, sim: _label(sim, "--sym", "I1", "--spacing", "60"), ("--spacing 60", "0 regions", "I1")),
    Row("label-spacing-out-of-range", lambda ws, sim: _label(sim, "--spacing", "0"), ("spacing_deg", "greater than 0")),
    Row("label-config-unknown-key", lambda ws, sim: _label(sim, "--config", _config(ws, "label:\n  min_particles: 3\n")),
        ("bad.yaml", "label.min_particles", "Extra inputs are not permitted")),
    Row("label-config-wrong-type", lambda ws, sim: _label(sim, "--config", _config(ws, "label:\n  min_particles_per_region: many\n")),
        ("bad.yaml", "label.min_particles_per_region", "valid integer")),
    Row("label-config-not-yaml", lambda ws, sim: _label(sim, "--config", _config(ws, "label: [1, 2\n")), ("bad.yaml", "not valid YAML")),
    Row("label-subset-moved-away-from-its-stack", lambda ws, sim: ["label", sim, "--subset", _write(ws / "moved.star", _subset(sim))],
        ("moved.star: particle 1 (000001@simulated/particles.mrcs): stack not found",)),
    Row("label-subset-stack-of-another-box", lambda ws, sim: ["label", sim, "--subset", _with_images(ws / "wrongbox.star", sim, _absolute, 64, subset=True)],
        ("wrongbox.star: particle 1 (", "holds 32 px images but rlnImageSize is 64")),
    Row("label-subset-index-beyond-stack", lambda ws, sim: ["label", sim, "--subset", _with_images(ws / "beyond.star", sim, _beyond_at_row_3, subset=True)],
        ("beyond.star: particle 4 (000999@", "image 999 requested but", "holds 200")),
    Row("label-unknown-subset-suffix", lambda ws, sim: ["label", sim, "--subset", _text(ws / "subset.txt", "1@a.mrcs 0 0 0\n")],
        ("subset.txt", "unknown particle file type '.txt'")),
    Row("label-corrupt-cryosparc-file", lambda ws, sim: ["label", sim, "--subset", _text(ws / "bad.cs", b"\x93NUMPY garbage")],
        ("bad.cs", "not a cryoSPARC .cs file")),
    Row("label-subset-pixel-size-differs-from-project", lambda ws, sim: ["label", sim, "--subset", _write(ws / "other_pixel.star", star.with_pixel_size(_subset(sim), 1.5))],
        ("other_pixel.star", "pixel size 1.5", "differs")),
    Row("label-output-folder-is-a-file", _label_into_a_file, ("label", "not a folder")),
    Row("label-read-only-project", lambda ws, sim: _label(sim), ("label", "Permission denied"), read_only_project=True),
    Row("consensus-empty-input", lambda ws, sim: ["consensus", _empty_star(ws), sim / "simulated" / "truth.star", "--project", sim],
        ("empty.star", "empty")),
    Row("consensus-single-input", lambda ws, sim: ["consensus", sim / "simulated" / "truth.star"], ("truth.star", "at least two")),
]


# ------------------------------------------------------------------ later stages (train, predict, align)


def _labelled(sim: Path) -> Path:
    run_deepalign("label", sim, "--subset", sim / "simulated" / "subset.star", check=True)
    return sim


def _labels_from_other_box(ws: Path, sim: Path) -> list:
    _labelled(sim)
    labels = star.read_particles(sim / "label" / "labels.star")
    n = len(labels)
    stack = ws / "small.mrcs"
    with mrcfile.new(stack) as m:
        m.set_data(np.random.default_rng(1).normal(size=(n, 16, 16)).astype(np.float32))
        m.voxel_size = float(star.pixel_size(labels))
    labels.particles["rlnImageName"] = [f"{i + 1:06d}@{stack}" for i in range(n)]
    star.write_particles(sim / "label" / "labels.star", labels)
    return ["train", sim]


def _empty_labels(ws: Path, sim: Path) -> list:
    _labelled(sim)
    (sim / "label" / "labels.star").write_text(_empty_star(ws).read_text())
    return ["train", sim]


def _fake_trained(sim: Path, regions, payload: bytes = b"not msgpack") -> None:
    from deepalign_cli.io.project import Project

    _labelled(sim)
    (sim / "train").mkdir()
    for r in regions:
        (sim / "train" / f"region_{r:03d}.msgpack").write_bytes(payload)
    Project.open(sim).mark_done("train", outputs=[], seconds=1.0)


def _missing_checkpoints(ws: Path, sim: Path) -> list:
    _fake_trained(sim, [0])
    return ["predict", sim]


def _corrupt_checkpoints(ws: Path, sim: Path) -> list:
    _fake_trained(sim, range(42))
    return ["predict", sim]


def _particles_with(sim: Path, edit) -> None:
    path = sim / "simulated" / "particles.star"
    table = star.read_particles(path)
    edit(table)
    star.write_particles(path, table)


def _stack_index_beyond_stack(ws: Path, sim: Path) -> list:
    _labelled(sim)
    _particles_with(sim, lambda t: t.particles.__setitem__("rlnImageName", ["000999@simulated/particles.mrcs", *t.particles["rlnImageName"][1:]]))
    return ["align", sim, "--exhaustive", "--reference", sim / "simulated" / "map.mrc"]


def _nan_image(ws: Path, sim: Path) -> list:
    _labelled(sim)
    with mrcfile.mmap(sim / "simulated" / "particles.mrcs", "r+", permissive=True) as m:
        m.data[7, 5, 5] = np.nan
    return ["align", sim, "--exhaustive", "--reference", sim / "simulated" / "map.mrc"]


def _coarse_reference(ws: Path, sim: Path) -> list:
    _labelled(sim)
    return ["align", sim, "--exhaustive", "--reference", _map(ws / "coarse.mrc", voxel_ang=40.0)]


STAGE_ROWS = [
    Row("train-labels-from-another-box", _labels_from_other_box, ("labels.star", "16 px", "32 px")),
    Row("train-empty-labels", _empty_labels, ("labels.star", "empty")),
    Row("predict-missing-region-checkpoints", _missing_checkpoints, ("train", "no checkpoint for region(s) 1-41")),
    Row("predict-corrupt-checkpoint", _corrupt_checkpoints, ("region_000.msgpack", "not a deepalign checkpoint")),
    Row("align-without-predictions", lambda ws, sim: ["align", _labelled(sim)], ("predictions.star", "run deepalign predict first")),
    Row("align-stack-index-beyond-stack", _stack_index_beyond_stack, ("particles.mrcs", "image 999", "200")),
    Row("align-nan-image", _nan_image, ("particles.mrcs", "NaN")),
    Row("align-reference-coarser-than-particles", _coarse_reference, ("coarse.mrc", "coarser")),
]
ROWS += STAGE_ROWS


# ------------------------------------------------------------------------------------------ runner


def snapshot(root: Path) -> dict:
    """Every file and folder under root (hidden ones too): files by size, mtime and SHA-256."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            tree[os.path.relpath(os.path.join(folder, name), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if os.path.isfile(path) else os.readlink(path)
            tree[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
    return tree


def run_in_process(args: list, cwd: Path, monkeypatch, capfd) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `deepalign ARGS` through the console script's `run()`."""
    from deepalign_cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("COLUMNS", WIDE_TERMINAL)
    monkeypatch.setattr(sys, "argv", ["deepalign", *map(str, args)])
    capfd.readouterr()
    try:
        main.run()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_line_error_and_changes_nothing(row, sim_project, tmp_path, monkeypatch, capfd):
    args = row.setup(tmp_path, sim_project)
    if row.read_only_project:
        os.chmod(sim_project, 0o555)
        if os.access(sim_project, os.W_OK):
            os.chmod(sim_project, 0o755)
            pytest.skip("running as root: chmod 0o555 does not stop root's writes (the full-disk row covers write failures)")
    before = snapshot(tmp_path)
    try:
        if row.limit_file_size:
            done = run_deepalign(*args, cwd=tmp_path, preexec_fn=_limit_file_size)
            code, err = done.returncode, done.stderr
        else:
            code, _, err = run_in_process(args, tmp_path, monkeypatch, capfd)
    finally:
        os.chmod(sim_project, 0o755)
    lines = err.strip().splitlines()
    assert code != 0, f"exit code 0 for {row.id}; stderr: {err!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for part in row.expect:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert snapshot(tmp_path) == before, "the failed command changed the work folder"


def test_console_script_prints_the_same_line(sim_project, tmp_path, monkeypatch, capfd):
    args = _label(sim_project, "--sym", "X3")
    code, _, err = run_in_process(args, tmp_path, monkeypatch, capfd)
    done = run_deepalign(*args, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (code, err) == (1, f"error: --sym X3: unknown symmetry 'X3': use C1, Cn, Dn, T, O, I1 or I2 (RELION names)\n")


def test_init_accepts_a_relion_star_beside_its_stack(sim_project, tmp_path):
    """The real case behind the stack check: RELION names like ``1@./batch_0_restacked.mrc``,
    resolved from the STAR's folder, pass when the stack is there."""
    folder = tmp_path / "relion"
    folder.mkdir()
    shutil.copy(sim_project / "simulated" / "particles.mrcs", folder / "batch_0_restacked.mrc")
    star_path = _with_images(folder / "particles.star", sim_project, lambda i, s: f"{i + 1}@./batch_0_restacked.mrc")
    done = run_deepalign("init", tmp_path / "P", "--particles", star_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "200 particles, box 32 px" in done.stderr
