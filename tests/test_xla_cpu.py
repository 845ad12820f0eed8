"""deepalign's XLA:CPU setting: added to XLA_FLAGS by `runtime.configure_process`, never over a user's own flag."""

import subprocess
import sys

from deepalign_cli import xla_cpu


def test_tuning_is_added_for_tested_jaxlib_and_keeps_other_flags():
    out = xla_cpu.flags_with_tuning("--xla_force_host_platform_device_count=4", "0.10.2")
    assert out == f"--xla_force_host_platform_device_count=4 {xla_cpu.YNN_FLAG}={xla_cpu.YNN_VALUE}"


def test_user_flag_wins_and_untested_jaxlib_gets_nothing():
    mine = f"{xla_cpu.YNN_FLAG}=-reduce"
    assert xla_cpu.flags_with_tuning(mine, "0.10.2") == mine
    assert xla_cpu.flags_with_tuning("", "0.9.1") == ""
    assert xla_cpu.flags_with_tuning("", "0.11.0") == ""
    assert xla_cpu.flags_with_tuning("", None) == ""


def test_opt_out_leaves_environment_alone():
    env = {xla_cpu.OPT_OUT: "0", "XLA_FLAGS": "--foo"}
    xla_cpu.configure(env)
    assert env["XLA_FLAGS"] == "--foo"


def test_configure_process_sets_the_flag_before_jax_starts():
    """In a fresh interpreter: `configure_process()`, then JAX compiles with the setting (an XLA
    that rejected the flag would abort here)."""
    code = (
        "import os; from deepalign_cli.runtime import configure_process; configure_process(); import jax, jax.numpy as jnp; "
        "print(os.environ.get('XLA_FLAGS', '')); print(float(jax.jit(lambda x: x.sum())(jnp.ones(3))))"
    )
    env_flags, value = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}).stdout.split("\n")[:2]
    expected = xla_cpu.flags_with_tuning("", xla_cpu.jaxlib_version())
    assert env_flags == expected
    assert value == "3.0"
