"""Shared fixtures: a tiny simulated project, made once per test session with the real CLI.

    def test_something(sim_project, run_cli):   # fresh copy, yours to change
        result = run_cli("label", sim_project, "--subset", sim_project / "simulated" / "subset.star")
        assert result.returncode == 0, result.stderr

    def test_other(sim_project_labelled, run_cli):
        run_cli("train", sim_project_labelled, check=True)

`run_cli` (= `run_deepalign`, importable as ``from conftest import run_deepalign``) runs the real
entry point in a fresh interpreter and returns the CompletedProcess.

* ``sim_project``: ``deepalign simulate`` with `SIM_ARGS` (200 particles, box 32 px at
  10.15625 Å/px from the shipped 65³ ribosome at 5 Å/px, SNR 0.1, CTF, 15 % = 30 pre-aligned
  particles in ``simulated/subset.star``, seed 0). Stage ``simulate`` is done.
* ``sim_project_labelled``: the same plus ``deepalign label --subset simulated/subset.star``
  (C1, 30° → 42 regions; most regions hold 0–2 particles). Stages ``simulate`` and ``label`` done.

Both are function-scoped copies (``shutil.copytree`` into ``tmp_path / "sim"`` and
``tmp_path / "sim_labelled"``) of session-scoped
originals, with the absolute paths in ``project.yaml`` moved to the copy, so a test may change,
rerun or break its project freely.
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # the settings the CLI runs with (XLA flags, malloc): first, before anything imports JAX

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

N_PARTICLES = 200
BOX_PX = 32
PRE_ALIGNED_FRACTION = 0.15
SEED = 0
SIM_ARGS = ("--n-particles", str(N_PARTICLES), "--box", str(BOX_PX), "--pre-aligned-fraction", str(PRE_ALIGNED_FRACTION),
            "--seed", str(SEED))
N_SUBSET = round(PRE_ALIGNED_FRACTION * N_PARTICLES)
SHIPPED_MAP_BOX, SHIPPED_MAP_PIXEL_ANG = 65, 5.0
SIM_PIXEL_ANG = SHIPPED_MAP_PIXEL_ANG * SHIPPED_MAP_BOX / BOX_PX  # Fourier crop 65 → 32 px
CLI_TIMEOUT_S = 300
WIDE_TERMINAL = "200"  # rich wraps at 80 columns when stderr is not a terminal


def run_deepalign(*args, cwd: Path | str | None = None, env: dict | None = None, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run `deepalign ARGS` in a fresh interpreter (the real entry point `deepalign_cli.main:run`).

    Returns the CompletedProcess (text stdout/stderr). JAX is pinned to the CPU unless the caller's
    environment chooses a platform. check=True fails the test with the command's stderr.
    """
    full_env = {**os.environ, "COLUMNS": WIDE_TERMINAL, **(env or {})}
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, "-m", "deepalign_cli.main", *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"deepalign {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


@pytest.fixture
def run_cli():
    """`run_deepalign` as a fixture (for test modules that should not import conftest)."""
    return run_deepalign


def relocate_project(src: Path, dst: Path) -> Path:
    """Copy project `src` to `dst` and point the absolute paths in dst/project.yaml at the copy."""
    shutil.copytree(src, dst, symlinks=True)
    yaml_path = dst / "project.yaml"
    old = re.escape(str(Path(src).resolve()))
    text = re.sub(old + r"(?=[/'\"\s]|$)", str(Path(dst).resolve()), yaml_path.read_text(), flags=re.M)
    yaml_path.write_text(text)
    return dst


@pytest.fixture(scope="session")
def sim_project_original(tmp_path_factory) -> Path:
    """The session's simulated project. Read-only by convention: use `sim_project` to change it."""
    root = tmp_path_factory.mktemp("sim_original") / "sim"
    run_deepalign("simulate", root, *SIM_ARGS, check=True)
    return root


@pytest.fixture(scope="session")
def sim_project_labelled_original(tmp_path_factory, sim_project_original) -> Path:
    root = relocate_project(sim_project_original, tmp_path_factory.mktemp("sim_labelled_original") / "sim")
    run_deepalign("label", root, "--subset", root / "simulated" / "subset.star", check=True)
    return root


@pytest.fixture
def sim_project(tmp_path, sim_project_original) -> Path:
    """A fresh copy of the simulated project at tmp_path / "sim" (stage simulate done)."""
    return relocate_project(sim_project_original, tmp_path / "sim")


@pytest.fixture
def sim_project_labelled(tmp_path, sim_project_labelled_original) -> Path:
    """A fresh copy of the simulated + labelled project at tmp_path / "sim_labelled" (simulate, label done)."""
    return relocate_project(sim_project_labelled_original, tmp_path / "sim_labelled")
