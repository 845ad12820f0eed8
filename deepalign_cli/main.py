"""`deepalign` command line: staged subcommands that read and write a project directory.

    deepalign simulate demo --n-particles 2000
    deepalign label demo --subset demo/simulated/subset.star
    deepalign train demo --config configs/demo.yaml
    deepalign predict demo --top-k 2
    deepalign align demo
    deepalign reconstruct demo
    deepalign consensus a.star b.star --threshold 5
    deepalign reconstruct-args demo --program relion

Each command module in `commands/` exposes `command` (a Typer-compatible function). Errors of
type DeepAlignError are printed as one red line on stderr with exit code 1. `run` applies the
process-wide settings (`runtime.configure_process`: XLA flags, malloc) before any command loads.
"""

from __future__ import annotations

import functools
import importlib
import sys

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from .errors import DeepAlignError
from .runtime import configure_process

# (command name, module in deepalign_cli.commands, one-line help) in pipeline order
STAGES = [
    ("init", "init", "Create a project directory from a particle STAR."),
    ("simulate", "simulate", "Simulate particles (CTF, noise, known poses) from a map."),
    ("label", "label", "Assign the pre-aligned subset to projection-direction regions."),
    ("train", "train", "Train one CNN per region on the labelled subset."),
    ("predict", "predict", "Probabilities of every particle for every region; keep the top-k."),
    ("align", "align", "Correlation search inside each particle's top-k regions."),
    ("reconstruct", "reconstruct", "Fourier reconstruction with CTF correction and half-set FSC."),
    ("refine", "refine", "Gold-standard local refinement of the poses to the data's resolution."),
    ("consensus", "consensus", "Keep particles whose poses from several methods agree."),
    ("reconstruct-args", "reconstruct_args", "Print commands that reconstruct the result in RELION/Xmipp/cryoSPARC."),
    ("report", "report", "Accuracy and timing report of a project (optionally against the truth)."),
    ("slurm", "slurm", "Write SLURM array scripts that shard a stage over regions."),
]


def _not_built(name: str):
    def command(args: list[str] = typer.Argument(None)) -> None:
        raise DeepAlignError(f"deepalign {name}: this stage is not built yet in this version")

    return command


def _placeholder(args: list[str] = typer.Argument(None)) -> None:  # pragma: no cover - never invoked
    raise DeepAlignError("internal error: a stage that was not loaded was invoked")


def _flags_without_metavar(params: list) -> list:
    """Boolean flags (``--force``, ``--help``) take no value: clear the ``<bool>`` typer would show
    after them in --help. Options that take a value keep theirs (``--epochs <int>``)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _flags_without_metavar(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _flags_without_metavar(super().get_params(ctx))


def build_app(only: str | None = None) -> typer.Typer:
    """The Typer app. With `only` (a stage name), only that stage's module is imported and the
    others are registered as placeholders with their one-line help: a stage's process then skips
    the other stages' imports (flax, optax, matplotlib …; ~0.3 s of start-up per command)."""
    app = typer.Typer(
        name="deepalign",
        help="DeepAlign for cryo-EM: regionalised deep learning + restricted correlation search.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        cls=_Group,
    )
    for name, module, help_ in STAGES:
        if only is not None and name != only:
            app.command(name, help=help_, cls=_Command)(_placeholder)
            continue
        try:
            fn = importlib.import_module(f".commands.{module}", __package__).command
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.commands.{module}":
                raise
            fn, help_ = _not_built(name), f"(not built yet) {help_}"
        app.command(name, help=(fn.__doc__ or help_).strip().split("\n\n")[0] if fn.__doc__ else help_, cls=_Command)(fn)
    return app


@functools.lru_cache(maxsize=1)
def _full_app() -> typer.Typer:
    return build_app()


def __getattr__(name: str):
    if name == "app":  # `deepalign_cli.main.app`: every stage loaded (tests, python -m, docs)
        return _full_app()
    raise AttributeError(name)


def _requested_stage(argv: list[str]) -> str | None:
    """The stage named on the command line (its first non-option word), if it is one."""
    word = next((a for a in argv[1:] if not a.startswith("-")), None)
    return word if word in {name for name, _, _ in STAGES} else None


def run() -> None:
    """Entry point: process-wide settings first, then the command; DeepAlignError becomes one red
    line and exit code 1."""
    configure_process()  # before any command module or JAX backend starts
    try:
        stage = _requested_stage(sys.argv)
        app = build_app(stage) if stage is not None else _full_app()
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except DeepAlignError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        Console(stderr=True).print("[red]aborted[/red]")
        sys.exit(130)
    except Exception as e:  # usage errors come through as click exceptions (vendored in new typer)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    run()
