"""Progress where stderr is not a terminal (SLURM logs, `| tee`): plain lines every 10 % of the
total or every 30 s, whichever comes first, and one at the end; the rich bar stays on a terminal."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from rich.progress import Progress

from conftest import run_deepalign
from deepalign_cli.commands import _common
from deepalign_cli.commands._common import PLAIN_INTERVAL_S, PlainProgress

LINE = re.compile(r"^(?P<desc>.+): (?P<done>[\d.]+)/(?P<total>[\d.]+) \((?P<pct>\d+)%\)(?P<rate> .*)?, "
                  r"elapsed (?P<elapsed>\d+:\d\d:\d\d), ETA (?P<eta>\d+:\d\d:\d\d|\?)$")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _plain(clock: FakeClock) -> tuple[PlainProgress, io.StringIO]:
    out = io.StringIO()
    return PlainProgress(Console(file=out, width=200), clock=clock), out


def _lines(out: io.StringIO) -> list[re.Match]:
    text = out.getvalue().splitlines()
    matches = [LINE.match(ln) for ln in text]
    assert all(matches), text
    return matches


def test_fast_progress_prints_a_line_per_10_percent_and_none_twice():
    clock = FakeClock()
    bar, out = _plain(clock)
    with bar:
        task = bar.add_task("align (local)", total=1000, rate="")
        for done in range(1, 1001):
            clock.now += 0.01  # 10 s in all: the 30 s rule never fires
            bar.update(task, completed=done, rate=f"{done / clock.now:.0f} particles/s")
    lines = _lines(out)
    assert [int(m["done"]) for m in lines] == list(range(100, 1001, 100))
    assert [int(m["pct"]) for m in lines] == list(range(10, 101, 10))
    assert lines[0]["desc"] == "align (local)" and lines[0]["rate"] == " 100 particles/s"
    assert lines[4]["elapsed"] == "0:00:05" and lines[4]["eta"] == "0:00:05"  # 500 left at 100/s
    assert lines[-1]["eta"] == "0:00:00"


def test_slow_progress_prints_a_line_every_30_seconds():
    clock = FakeClock()
    bar, out = _plain(clock)
    with bar:
        task = bar.add_task("train 42 regions @ 32 px", total=100, rate="")
        for _ in range(9):  # 10 s per step, 9 % in all: no 10 % step is crossed
            clock.now += 10
            bar.advance(task, 1)
    lines = _lines(out)
    assert [int(m["done"]) for m in lines] == [3, 6, 9]  # at 30 s, 60 s, 90 s; the end line is the 9 already shown
    assert [m["elapsed"] for m in lines] == ["0:00:30", "0:01:00", "0:01:30"]
    assert lines[1]["eta"] == "0:15:40"  # 94 left at 3 per 30 s since the first update (t = 10 s)


def test_either_rule_restarts_the_30_second_wait():
    clock = FakeClock()
    bar, out = _plain(clock)
    with bar:
        task = bar.add_task("predict", total=100, rate="")
        clock.now = 25
        bar.update(task, completed=10)  # 10 %: a line at 25 s
        clock.now = 50
        bar.update(task, completed=12)  # 25 s after that line: none
        clock.now = 55
        bar.update(task, completed=13)  # 30 s after it: a line
    assert [(int(m["done"]), m["elapsed"]) for m in _lines(out)] == [(10, "0:00:25"), (13, "0:00:55")]


def test_the_end_line_comes_on_exit_and_not_after_an_error():
    clock = FakeClock()
    bar, out = _plain(clock)
    with bar:
        task = bar.add_task("reconstruct", total=100, rate="")
        clock.now = 5
        bar.update(task, completed=55)  # 50 % crossed
        clock.now = 6
        bar.update(task, completed=57)
    assert [int(m["done"]) for m in _lines(out)] == [55, 57]

    bar, out = _plain(clock)
    with pytest.raises(RuntimeError):
        with bar:
            task = bar.add_task("align", total=100, rate="")
            bar.update(task, completed=5)
            raise RuntimeError("a failing stage")
    assert out.getvalue() == ""  # the stage's error line stays the last line


def test_a_resumed_head_start_does_not_shorten_the_eta():
    clock = FakeClock()
    bar, out = _plain(clock)
    with bar:
        task = bar.add_task("align (local)", total=1000, rate="")
        clock.now = 1
        bar.update(task, completed=500)  # resumed: half was done by an earlier run
        clock.now = 11
        bar.update(task, completed=600)  # 10 /s since then
    assert _lines(out)[-1]["eta"] == "0:00:40"


def test_warnings_go_through_the_same_console():
    bar, out = _plain(FakeClock())
    with bar:
        bar.console.print("[yellow]warning:[/yellow] region 3 has no positives")
    assert out.getvalue() == "warning: region 3 has no positives\n"


def test_a_terminal_keeps_the_rich_bar_and_a_pipe_gets_plain_lines(monkeypatch):
    monkeypatch.setattr(_common, "console", Console(file=io.StringIO(), force_terminal=True))
    assert isinstance(_common.progress(), Progress)
    monkeypatch.setattr(_common, "console", Console(file=io.StringIO(), force_terminal=False))
    assert isinstance(_common.progress(), PlainProgress)
    assert PLAIN_INTERVAL_S == 30.0


def test_a_real_stage_with_stderr_piped_prints_progress_lines(sim_project):
    done = run_deepalign("reconstruct", sim_project, "--from", sim_project / "simulated" / "truth.star", "--out", "truth",
                         check=True)
    lines = [m for m in map(LINE.match, done.stderr.splitlines()) if m]
    assert lines, done.stderr
    assert lines[-1]["desc"] == "reconstruct truth" and lines[-1]["done"] == lines[-1]["total"] == "200"
    assert lines[-1]["rate"].endswith("particles/s")
