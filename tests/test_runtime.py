"""Process-wide settings: importing deepalign changes nothing; `configure_process` (called by the
CLI entry point before any command loads) sets the XLA flag and the malloc thresholds."""

from __future__ import annotations

import subprocess
import sys

from deepalign_cli import host_malloc, xla_cpu

CLEAN_ENV = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}

# In a fresh interpreter: import the package and every command module (JAX, flax, … included) and
# report what the process looks like; then optionally what `configure_process` or `main.run` made of it.
REPORT = """
import importlib, os, sys
import deepalign_cli, deepalign_cli.main as main
from deepalign_cli import host_malloc
from deepalign_cli.main import STAGES
for _, module, _ in STAGES:
    importlib.import_module(f"deepalign_cli.commands.{module}")
print(repr(os.environ.get("XLA_FLAGS")), host_malloc._applied)
if sys.argv[1] == "configure":
    from deepalign_cli.runtime import configure_process
    configure_process()
elif sys.argv[1] == "run":
    sys.argv = ["deepalign", "--help"]
    try:
        main.run()
    except SystemExit as e:
        assert e.code == 0, e.code
import jax, jax.numpy as jnp
print(repr(os.environ.get("XLA_FLAGS")), host_malloc._applied, float(jax.jit(lambda x: x.sum())(jnp.ones(3))))
"""


def _report(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", REPORT, mode], capture_output=True, text=True, check=True, env=CLEAN_ENV).stdout
    return out.strip().splitlines()[-2:]


def _expected_flags() -> str | None:
    return xla_cpu.flags_with_tuning("", xla_cpu.jaxlib_version()) or None


def test_importing_deepalign_and_its_commands_changes_nothing():
    assert _report("import") == ["None None", "None None 3.0"]


def test_configure_process_sets_the_flag_before_jax_starts_and_the_malloc_thresholds():
    """JAX then compiles with the flag (an XLA that rejected it would abort here)."""
    before, after = _report("configure")
    assert before == "None None"
    applied = host_malloc._glibc() is not None
    assert after == f"{_expected_flags()!r} {applied} 3.0"


def test_the_cli_entry_point_configures_the_process():
    _, after = _report("run")
    assert after == f"{_expected_flags()!r} {host_malloc._glibc() is not None} 3.0"


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "deepalign_cli.main", "init", "--help"], capture_output=True, text=True,
                          env=CLEAN_ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--particles" in done.stdout


def test_opt_outs_leave_the_process_alone():
    env = {xla_cpu.OPT_OUT: "0", host_malloc.OPT_OUT: "0", "XLA_FLAGS": "--foo"}
    from deepalign_cli.runtime import configure_process

    configure_process(env)
    assert env["XLA_FLAGS"] == "--foo"
