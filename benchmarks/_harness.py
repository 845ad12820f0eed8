"""What every benchmark shares: the machine a figure was measured on, its result file, timing.

    from _harness import write_result
    write_result("align", {"settings": …, "results": rows})   # → benchmarks/results/align.json

Every result file is one JSON object with a ``"machine"`` entry (`machine_info`: CPU model, cores,
RAM, GPUs, JAX/jaxlib/flax versions, git commit, date, load average), written atomically. Only
the latest file of a benchmark is kept in ``benchmarks/results/``; git keeps the earlier ones.

Importing this module does not import JAX: a script that runs JAX itself calls
``deepalign_cli.runtime.configure_process()`` before JAX starts. `machine_info` reads the JAX
backend and devices only when the script has imported JAX already; the timing helpers import it
when called.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from deepalign_cli.io.atomic import atomic_write

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _run(cmd: list[str], env: dict | None = None) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _static_info() -> dict:
    gpus = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    # GIT_OPTIONAL_LOCKS=0: `git status` neither refreshes nor locks the index of a working tree in use
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpus": gpus.splitlines() if gpus else [],
        "python": platform.python_version(),
        **{p: _version(p) for p in PACKAGES},
        "git_commit": _run(["git", "rev-parse", "HEAD"]),
        "git_dirty": None if dirty is None else bool(dirty),
        "jax_platforms_env": os.environ.get("JAX_PLATFORMS"),
    }


def machine_info() -> dict:
    """Where and when this process measures: the static facts above, the date and load average,
    and the JAX backend and devices when the script has imported JAX."""
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), **_static_info()}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    jax = sys.modules.get("jax")
    if jax is not None:
        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def _plain(x):
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / JAX scalars
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def write_result(name: str, data: dict, out: Path | str | None = None) -> Path:
    """Write ``{"machine": machine_info(), **data}`` as JSON to `out`, default
    ``benchmarks/results/NAME.json``, atomically (tmp file + rename). Returns the path."""
    if "machine" in data:
        raise ValueError("result data has its own 'machine' entry; write_result adds it")
    dest = Path(out) if out is not None else RESULTS / f"{name}.json"
    text = json.dumps({"machine": machine_info(), **data}, indent=1, default=_plain) + "\n"
    with atomic_write(dest) as tmp:
        tmp.write_text(text)
    return dest


# --------------------------------------------------------------------------- timing


def best_seconds(fn, *args, reps: int = 3, warmup: int = 1) -> float:
    """Fastest wall time of `reps` calls of fn(*args), each waited for (`jax.block_until_ready`),
    after `warmup` untimed calls (compilation)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_flops(size: int = 2048, dtype: str = "float32", precision=None, reps: int = 3) -> float:
    """FLOP/s of a jitted (size × size) matmul in `dtype` at `precision`: the machine's ceiling
    beside the benchmarks' GEMM-bound programs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=precision))
    return 2 * size**3 / best_seconds(f, a, reps=reps)


def xla_cost(fn, *args) -> dict:
    """XLA's cost analysis of `fn` (jitted here unless it already is) compiled for the default
    device: {"flops", "bytes" ("bytes accessed"), "transcendentals"}."""
    import jax

    lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {key: float(cost.get(name, float("nan")))
            for key, name in (("flops", "flops"), ("bytes", "bytes accessed"), ("transcendentals", "transcendentals"))}
