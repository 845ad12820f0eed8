"""Plumbing shared by the command modules: console, progress bars, timing, config flags."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..config import DeepAlignConfig, load_config, override
from ..errors import DeepAlignError

console = Console(stderr=True, soft_wrap=True)

PROJECT_ARG = typer.Argument(..., help="project directory", show_default=False)
CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML config (see configs/); flags override it", show_default=False)
FORCE_OPT = typer.Option(False, "--force", help="redo a stage that is already done")


def stage_config(config_path: Path | None, section: str, **flags):
    """(whole config, the stage's section with the non-None flags applied)."""
    cfg: DeepAlignConfig = load_config(config_path)
    stage = override(getattr(cfg, section), **flags)
    return cfg.model_copy(update={section: stage}), stage


def progress(transient: bool = True) -> Progress:
    """A rich progress bar on stderr; transient, so a finished or failed stage leaves only its summary or error line."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


@contextlib.contextmanager
def removed_on_failure(root: Path):
    """If `root` does not exist yet and the block fails, remove whatever it created."""
    existed = Path(root).exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        raise


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


def check_can_run(proj, stage: str, force: bool) -> None:
    """Refuse to redo a finished stage without --force. Nothing is changed here: the stage record
    is replaced only when the rerun succeeds, so a failed --force rerun leaves the project as it was."""
    if proj.is_done(stage) and not force:
        raise DeepAlignError(f"{proj.root}: stage '{stage}' already done; use --force to redo")
