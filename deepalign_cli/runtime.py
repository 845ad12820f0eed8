"""Process-wide settings deepalign runs with, applied explicitly by the program's entry point.

    from deepalign_cli.runtime import configure_process
    configure_process()          # first thing, before JAX computes anything
    import jax

`configure_process` applies both settings measured to pay on the CPU (reasons and figures in
their modules' docstrings):

* `xla_cpu.configure`: adds deepalign's XLA:CPU flag to ``XLA_FLAGS`` (convolutions and
  reductions off YNNPACK). XLA reads ``XLA_FLAGS`` once, when JAX creates its first backend, so a
  call after that changes nothing.
* `host_malloc.configure`: glibc's mmap/trim thresholds at 1 GiB, so XLA's large per-call
  temporaries are reused from the heap instead of faulted in on every call.

Who calls it: `deepalign_cli.main.run` (the ``deepalign`` console script and
``python -m deepalign_cli.main``) before it loads any command, and ``tests/conftest.py`` before
anything imports JAX. Importing `deepalign_cli` itself sets nothing, so a library user or a
notebook keeps its own process settings unless it asks for these. ``DEEPALIGN_XLA_CPU_TUNING=0``
and ``DEEPALIGN_MALLOC_TUNING=0`` turn each one off. `host_malloc.share_one_arena`, the third
setting, depends on the stage's box, so `train` and `predict` ask for it themselves.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from . import host_malloc, xla_cpu


def configure_process(environ: MutableMapping[str, str] | None = None) -> None:
    """Apply deepalign's XLA:CPU flag (to ``environ``, default ``os.environ``) and malloc thresholds.

    Idempotent; call it before JAX starts its backend."""
    xla_cpu.configure(environ)
    host_malloc.configure(environ)
