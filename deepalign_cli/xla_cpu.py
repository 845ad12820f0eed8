"""XLA:CPU settings deepalign runs with, applied by `runtime.configure_process` at the entry point.

XLA reads ``XLA_FLAGS`` when JAX creates its first backend, so `configure` must run before any
JAX computation; `runtime.configure_process` calls it (the CLI's `main.run`, ``tests/conftest.py``;
benchmarks and scripts that run JAX in-process call it themselves). Importing the package sets
nothing. It only *adds* to ``XLA_FLAGS``: a flag the user already set wins.

The one setting: ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce``.
jaxlib 0.10 hands convolutions and reductions to YNNPACK by default; for the region CNN the
plain XLA:CPU (Eigen) kernels are faster. Measured 2026-11-26 on the 2-core CI-class machine
(training step of one region, batch 128, image-steps/s, default → this setting, same code):
24 px 3,957 → 7,993; 32 px 2,077 → 2,643; 64 px 415 → 505; 120 px 81 → 103; prediction
(forward pass) 32 px 4,371 → 4,880 and 64 px 1,034 → 1,278 images/s. Matrix products (the
alignment's correlation search) keep YNNPACK (``benchmarks/RESULTS.md`` has the A/B of align).

Only for the jaxlib versions it was measured on (``TESTED_JAXLIB``): an XLA that does not know
a flag aborts the process, so an untested jaxlib gets no flag. ``DEEPALIGN_XLA_CPU_TUNING=0``
turns it off.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_VALUE = "-individual_convolution,-reduce"
TESTED_JAXLIB = ((0, 10), (0, 11))  # [lowest, highest) major.minor
OPT_OUT = "DEEPALIGN_XLA_CPU_TUNING"


def _version(text: str) -> tuple[int, int]:
    parts = (text.split(".") + ["0", "0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def jaxlib_version() -> str | None:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def flags_with_tuning(flags: str, jaxlib: str | None) -> str:
    """`flags` (an XLA_FLAGS value) plus deepalign's YNN setting, unless the user set that flag
    or `jaxlib` is not a tested version."""
    if jaxlib is None or not (TESTED_JAXLIB[0] <= _version(jaxlib) < TESTED_JAXLIB[1]):
        return flags
    if YNN_FLAG in flags:
        return flags
    return f"{flags} {YNN_FLAG}={YNN_VALUE}".strip()


def configure(environ: MutableMapping[str, str] | None = None) -> None:
    """Add the XLA:CPU setting to ``environ["XLA_FLAGS"]`` (default: ``os.environ``)."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1") == "0":
        return
    new = flags_with_tuning(environ.get("XLA_FLAGS", ""), jaxlib_version())
    if new:
        environ["XLA_FLAGS"] = new
