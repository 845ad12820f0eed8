"""Plumbing shared by the command modules: console, progress bars, timing, config flags."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..config import DeepAlignConfig, load_config, override
from ..errors import DeepAlignError
from ..io.atomic import remove_pending

console = Console(stderr=True, soft_wrap=True)

PROJECT_ARG = typer.Argument(..., help="project directory", show_default=False)
CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML config (see configs/); flags override it", show_default=False)
FORCE_OPT = typer.Option(False, "--force", help="redo a stage that is already done")
EXIT_INTERRUPTED = 130  # shell convention for a command stopped by SIGINT


def stage_config(config_path: Path | None, section: str, **flags):
    """(whole config, the stage's section with the non-None flags applied)."""
    cfg: DeepAlignConfig = load_config(config_path)
    stage = override(getattr(cfg, section), **flags)
    return cfg.model_copy(update={section: stage}), stage


PLAIN_STEP_FRACTION = 0.1  # without a terminal: a progress line every 10 % of the total …
PLAIN_INTERVAL_S = 30.0  # … or every 30 s, whichever comes first


def _clock_text(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def _count_text(count: float) -> str:
    return str(int(count)) if float(count).is_integer() else f"{count:.1f}"


@dataclasses.dataclass
class _PlainTask:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started_at: float
    first_update: tuple[float, float] | None = None  # (time, completed) at the first update: the rate excludes a resumed head start
    printed: tuple[float, float] | None = None  # (time, completed) of the last line


class PlainProgress:
    """`progress()` where stderr is not a terminal (SLURM logs, ``| tee``), where rich's bar would
    print nothing: one plain line per 10 % of the total or per 30 s, whichever comes first, and one
    at the end, e.g.

        train 42 regions @ 32 px: 120/420 (29%) 3.1 epochs/s, elapsed 0:00:39, ETA 0:01:37

    It has the part of rich's `Progress` the commands use: ``add_task(description, total=…,
    **fields)``, ``update(task, completed=… | advance=…, **fields)``, ``advance(task, k)`` and
    ``console``. A stage that fails prints no end line, so its error stays the last line.
    `clock` (seconds, monotonic) is a parameter for tests.
    """

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic,
                 step_fraction: float = PLAIN_STEP_FRACTION, interval_s: float = PLAIN_INTERVAL_S):
        self.console = console
        self._clock = clock
        self._step_fraction = step_fraction
        self._interval_s = interval_s
        self._tasks: list[_PlainTask] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            for task in self._tasks:
                if task.printed is None or task.printed[1] != task.completed:
                    self._print(task, self._clock())
        return False

    def add_task(self, description: str, start: bool = True, total: float | None = None, completed: float = 0,
                 visible: bool = True, **fields) -> int:
        self._tasks.append(_PlainTask(description, total, completed, fields, started_at=self._clock()))
        return len(self._tasks) - 1

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None, advance: float | None = None,
               description: str | None = None, visible: bool | None = None, refresh: bool = False, **fields) -> None:
        task = self._tasks[task_id]
        old = task.completed
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        task.fields.update(fields)
        now = self._clock()
        if task.first_update is None:
            task.first_update = (now, task.completed)
        if self._due(task, old, now):
            self._print(task, now)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _due(self, task: _PlainTask, old: float, now: float) -> bool:
        if task.printed is not None and task.printed[1] == task.completed:
            return False
        last_time = task.started_at if task.printed is None else task.printed[0]
        if now - last_time >= self._interval_s:
            return True
        if not task.total:
            return False
        step = self._step_fraction * task.total
        return task.completed >= task.total or int(task.completed // step) > int(old // step)

    def _print(self, task: _PlainTask, now: float) -> None:
        task.printed = (now, task.completed)
        parts = [f"{task.description}: {_count_text(task.completed)}"]
        if task.total:
            parts[0] += f"/{_count_text(task.total)} ({100 * task.completed / task.total:.0f}%)"
        rate = str(task.fields.get("rate", "") or "")
        if rate:
            parts[0] += f" {rate}"
        parts.append(f"elapsed {_clock_text(now - task.started_at)}")
        if task.total:
            parts.append(f"ETA {self._eta(task, now)}")
        self.console.print(", ".join(parts), markup=False, highlight=False)

    def _eta(self, task: _PlainTask, now: float) -> str:
        left = task.total - task.completed
        if left <= 0:
            return _clock_text(0)
        t0, c0 = task.first_update if task.first_update is not None else (task.started_at, 0.0)
        if not (now > t0 and task.completed > c0):
            t0, c0 = task.started_at, 0.0
        if not (now > t0 and task.completed > c0):
            return "?"
        return _clock_text(left * (now - t0) / (task.completed - c0))


def progress(transient: bool = True) -> Progress | PlainProgress:
    """Progress on stderr. On a terminal a rich bar, transient, so a finished or failed stage leaves
    only its summary or error line; elsewhere (a log file, a pipe) plain lines, see `PlainProgress`."""
    if not console.is_terminal:
        return PlainProgress(console)
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


@contextlib.contextmanager
def exit_on_interrupt():
    """SIGTERM behaves like Ctrl-C; either one ends the command with one line and exit code 130.

    Everything written so far went through atomic renames, so the project stays valid and the
    stage's --resume picks up from the last saved piece of work."""
    main_thread = threading.current_thread() is threading.main_thread()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        remove_pending()  # a temporary file the interrupt caught between its creation and its rename
        console.print("[yellow]interrupted; rerun with --resume[/yellow]", highlight=False)
        raise SystemExit(EXIT_INTERRUPTED)
    finally:
        if previous is not None:  # None: not the main thread, or a handler installed outside Python
            signal.signal(signal.SIGTERM, previous)


def settings_digest(*parts) -> str:
    """sha256 (hex) of the JSON of `parts` (pydantic models, dicts, strings, bytes digests)."""
    h = hashlib.sha256()
    for part in parts:
        plain = part.model_dump(mode="json") if hasattr(part, "model_dump") else part
        h.update(plain if isinstance(plain, bytes) else json.dumps(plain, sort_keys=True, default=str).encode())
    return h.hexdigest()
