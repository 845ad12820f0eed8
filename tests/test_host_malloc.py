"""deepalign's glibc malloc settings: XLA:CPU's large temporaries reuse the heap instead of new
pages on every call (counted as page faults, not timed)."""

import os
import subprocess
import sys

import pytest

from deepalign_cli import host_malloc

# In a fresh interpreter: `configure_process()`, optionally `share_one_arena(BOX)`, then, after 10 warm-up calls
# (the heap grows to its working size), the median page faults of 30 calls of a jitted op whose
# output (128 × 16 × N² float32) XLA allocates in a worker thread and frees each time (the median:
# this VM's memory reclaim now and then takes back idle pages, tuned or not).
FAULTS = """
import resource, statistics, sys
from deepalign_cli.runtime import configure_process
configure_process()  # what the CLI entry point does first
import jax, jax.numpy as jnp
from deepalign_cli import host_malloc
box, n = int(sys.argv[1]), int(sys.argv[2])
one_arena = host_malloc.share_one_arena(box) if box else False
f = jax.jit(lambda x: x * 2 + 1)
x = jnp.ones((128, 16, n, n))
counts = []
for i in range(40):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready().delete()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(host_malloc.configure(), one_arena, host_malloc.share_one_arena(64), statistics.median(counts[10:]))
"""


def _run(tuning: str, box: int, n: int) -> tuple[str, str, str, float]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAX_PLATFORMS": "cpu", host_malloc.OPT_OUT: tuning}
    out = subprocess.run([sys.executable, "-c", FAULTS, str(box), str(n)], capture_output=True, text=True,
                         check=True, env=env).stdout
    applied, one_arena, later, per_call = out.split()
    return applied, one_arena, later, float(per_call)


needs_glibc = pytest.mark.skipif(host_malloc._glibc() is None, reason="mallopt is glibc's; other C libraries are left alone")


@needs_glibc
def test_thresholds_keep_a_33_mb_temporary_in_the_heap():
    pages = 128 * 16 * 64 * 64 * 4 / 4096  # 8,192 pages
    applied, _, _, tuned = _run("1", 0, 64)
    not_applied, _, _, untuned = _run("0", 0, 64)
    assert (applied, not_applied) == ("True", "False")
    assert untuned > 0.5 * pages  # glibc's default: a fresh mmap per call
    assert tuned < 0.1 * pages


@needs_glibc
def test_one_arena_keeps_a_temporary_above_64_mb_in_the_heap_and_only_before_jax_starts():
    pages = 128 * 16 * 96 * 96 * 4 / 4096  # 75.5 MB, more than a worker thread's arena can hold
    _, one_arena, later, shared = _run("1", 64, 96)
    assert (one_arena, later) == ("True", "True")
    assert shared < 0.1 * pages
    _, one_arena, later, thresholds_only = _run("1", 32, 96)  # small box: glibc's arenas kept
    assert (one_arena, later) == ("False", "False")  # and asking after JAX started changes nothing
    assert thresholds_only > 0.5 * pages


def test_opt_out_changes_nothing():
    assert host_malloc.configure({host_malloc.OPT_OUT: "0"}) is False


# The real `train` and `predict` entry points, with the box threshold lowered to this tiny
# project's 32 px: each must ask for one arena before JAX starts (else the request is refused).
CLI_WITH_REPORT = """
import sys
from deepalign_cli import host_malloc
host_malloc.ONE_ARENA_MIN_BOX = 0
real = host_malloc.share_one_arena
def reporting(box, environ=None):
    got = real(box, environ)
    print(f"one arena for {box} px: {got}", file=sys.stderr)
    return got
host_malloc.share_one_arena = reporting
from deepalign_cli.main import run
sys.argv = ["deepalign", *sys.argv[1:]]
run()
"""


@needs_glibc
def test_train_and_predict_ask_for_one_arena_before_jax_starts(sim_project_labelled, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "COLUMNS": "200"}
    cfg = tmp_path / "quick.yaml"
    cfg.write_text("train: {epochs: 1, images_per_region: 64, batch_size: 32, min_positives: 1}\n")
    for args in (["train", sim_project_labelled, "--config", cfg], ["predict", sim_project_labelled, "--config", cfg]):
        out = subprocess.run([sys.executable, "-c", CLI_WITH_REPORT, *map(str, args)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "one arena for 32 px: True" in out.stderr, (args[0], out.stderr[-2000:])
