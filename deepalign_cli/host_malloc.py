"""glibc malloc settings for XLA:CPU's large per-call temporaries.

XLA:CPU allocates each executable's temporaries (a 64-px training step: one ~130 MB slab of FFT
buffers, activations and gradients) with the C library's malloc, from one of its worker threads,
and frees them when the call returns. glibc serves blocks above its mmap threshold (dynamic, at
most 32 MiB) with a fresh ``mmap`` and returns them with ``munmap``; a worker thread's arena
cannot hold a block above 64 MiB at all. Either way every call touches new pages and pays one
page fault per 4 KiB. Measured 2026-11-26 on the 2-core CI-class machine (one region's training
step, batch 128; `benchmarks/experiments/malloc_ab.py`, on/off in alternating processes):

- 64 px: ~33,000 page faults per step → ~0; training 1.05–1.20×, prediction 1.43–1.52×;
- 120 px: training 1.09–1.19×, prediction 0.96×;
- 32 px (no block above 32 MiB): one shared arena makes the worker threads contend for its
  lock, training 0.84–0.97× (six alternating pairs), so small boxes keep glibc's arenas.

Two steps:
- `configure` (by `runtime.configure_process`, at the entry point): ``M_MMAP_THRESHOLD`` and
  ``M_TRIM_THRESHOLD`` = 1 GiB, so blocks below 1 GiB come from the heaps and freed memory is
  kept for reuse. 32 px: training 0.91–1.04× (within this machine's noise), prediction
  1.19–1.22×.
- `share_one_arena` (``M_ARENA_MAX`` = 1), called by `train` and `predict` for a working box of
  at least `ONE_ARENA_MIN_BOX` px *before JAX starts its threads*: every thread then allocates
  from the main heap, which can hold and reuse the big slab. Each setting alone left the
  64-px faults unchanged.

The cost: memory freed by the process is kept for reuse instead of returned to the OS, so
resident memory stays near the stage's peak — which the stage needed anyway. Only on glibc
(Linux); elsewhere, or with ``DEEPALIGN_MALLOC_TUNING=0``, nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

OPT_OUT = "DEEPALIGN_MALLOC_TUNING"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # from glibc's <malloc.h>
THRESHOLD_BYTES = 1 << 30
ONE_ARENA_MIN_BOX = 48
SETTINGS = ((M_MMAP_THRESHOLD, THRESHOLD_BYTES), (M_TRIM_THRESHOLD, THRESHOLD_BYTES))
_applied: bool | None = None
_one_arena: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Apply the thresholds (`SETTINGS`) with ``mallopt`` once per process; True if in force."""
    global _applied
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1") == "0":
        return False
    if _applied is None:
        libc = _glibc()
        _applied = libc is not None and all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    return _applied


def _jax_threads_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - JAX is a dependency
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check else True  # unknown JAX: assume too late, change nothing


def share_one_arena(box_px: int, environ: Mapping[str, str] | None = None) -> bool:
    """One malloc arena for the whole process if `box_px` ≥ `ONE_ARENA_MIN_BOX`, the thresholds
    are in force and JAX has not started its threads yet (a thread keeps the arena it first
    allocated from, so later it would change nothing). True if the process now has one arena."""
    global _one_arena
    if _one_arena is None:
        if box_px < ONE_ARENA_MIN_BOX or not configure(environ) or _jax_threads_started():
            return False
        libc = _glibc()
        _one_arena = libc is not None and libc.mallopt(M_ARENA_MAX, 1) == 1
    return _one_arena
