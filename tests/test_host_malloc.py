"""deepalign's glibc malloc setting: XLA:CPU's large temporaries reuse the heap instead of new
pages on every call (counted as page faults, not timed)."""

import os
import subprocess
import sys

import pytest

from deepalign_cli import host_malloc

# In a fresh interpreter, after 5 warm-up calls (the heap grows to its working size): the median
# page faults of 15 calls of a jitted op whose 33.5 MB output XLA allocates and frees each time
# (the median: this VM's memory reclaim now and then takes back idle pages, tuned or not).
FAULTS = """
import resource, statistics, deepalign_cli, jax, jax.numpy as jnp
from deepalign_cli import host_malloc
f = jax.jit(lambda x: x * 2 + 1)
x = jnp.ones((128, 16, 64, 64))
counts = []
for i in range(20):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready().delete()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(host_malloc.configure(), statistics.median(counts[5:]))
"""


def _median_faults(tuning: str) -> tuple[str, float]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAX_PLATFORMS": "cpu", host_malloc.OPT_OUT: tuning}
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True, env=env).stdout
    applied, per_call = out.split()
    return applied, float(per_call)


@pytest.mark.skipif(host_malloc._glibc() is None, reason="mallopt is glibc's; other C libraries are left alone")
def test_setting_stops_xla_temporaries_from_faulting_in_new_pages_every_call():
    applied, tuned = _median_faults("1")
    not_applied, untuned = _median_faults("0")
    assert (applied, not_applied) == ("True", "False")
    pages = 128 * 16 * 64 * 64 * 4 / 4096  # 8,192 pages in the output
    assert untuned > 0.5 * pages  # glibc's default: a fresh mmap per call
    assert tuned < 0.1 * pages


def test_opt_out_changes_nothing():
    assert host_malloc.configure({host_malloc.OPT_OUT: "0"}) is False
