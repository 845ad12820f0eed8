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
type DeepAlignError are printed as one red line on stderr with exit code 1.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from .errors import DeepAlignError

app = typer.Typer(
    name="deepalign",
    help="DeepAlign for cryo-EM: regionalised deep learning + restricted correlation search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (command name, module in deepalign_cli.commands, one-line help) in pipeline order
STAGES = [
    ("init", "init", "Create a project directory from a particle STAR."),
    ("simulate", "simulate", "Simulate particles (CTF, noise, known poses) from a map."),
    ("label", "label", "Assign the pre-aligned subset to projection-direction regions."),
    ("train", "train", "Train one CNN per region on the labelled subset."),
    ("predict", "predict", "Probabilities of every particle for every region; keep the top-k."),
    ("align", "align", "Correlation search inside each particle's top-k regions."),
    ("reconstruct", "reconstruct", "Fourier reconstruction with CTF correction and half-set FSC."),
    ("consensus", "consensus", "Keep particles whose poses from several methods agree."),
    ("reconstruct-args", "reconstruct_args", "Print commands that reconstruct the result in RELION/Xmipp/cryoSPARC."),
    ("report", "report", "Accuracy and timing report of a project (optionally against the truth)."),
    ("slurm", "slurm", "Write SLURM array scripts that shard a stage over regions."),
]


def _not_built(name: str):
    def command(args: list[str] = typer.Argument(None)) -> None:
        raise DeepAlignError(f"deepalign {name}: this stage is not built yet in this version")

    return command


for _name, _module, _help in STAGES:
    try:
        _mod = importlib.import_module(f".commands.{_module}", __package__)
        _fn = _mod.command
    except ModuleNotFoundError as _e:
        if _e.name != f"{__package__}.commands.{_module}":
            raise
        _fn = _not_built(_name)
        _help = f"(not built yet) {_help}"
    app.command(_name, help=(_fn.__doc__ or _help).strip().split("\n\n")[0] if _fn.__doc__ else _help)(_fn)


def run() -> None:
    """Entry point that turns DeepAlignError into one red line and exit code 1."""
    try:
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
