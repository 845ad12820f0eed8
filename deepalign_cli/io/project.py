"""The project directory: ``PROJECT/project.yaml`` plus one folder per stage.

``project.yaml`` records
* ``inputs``: the particle STAR (absolute path), pixel size (Å) and box (px);
* ``config``: the configuration each stage ran with (one section per stage, as in the YAML
  config files);
* ``stages``: ``{name: {done, finished_at, seconds, outputs}}``.

Every update re-reads the file, changes it and rewrites it atomically while holding an exclusive
``fcntl.flock`` on ``PROJECT/.lock``, so concurrent processes (e.g. SLURM shards of one stage)
never lose each other's changes.

    proj = Project.open(root)
    proj.require_done("label")
    proj.require_not_done("train", force)
    out = proj.stage_dir("train")            # PROJECT/train/, created
    ...
    proj.mark_done("train", outputs=[out / "metrics.json"], seconds=t, config=cfg.train)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel

from ..config import DeepAlignConfig
from ..errors import DeepAlignError
from .atomic import write_text_atomic

PROJECT_FILE = "project.yaml"
LOCK_FILE = ".lock"
FORMAT_VERSION = 1
STAGES = ("simulate", "label", "train", "predict", "align", "reconstruct", "consensus")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _plain(config: BaseModel | dict | None) -> dict | None:
    if config is None:
        return None
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return dict(config)


class Project:
    """A deepalign project folder. Create with `Project.create`, reopen with `Project.open`."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------------- files and locking
    @property
    def yaml_path(self) -> Path:
        return self.root / PROJECT_FILE

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> dict:
        try:
            state = yaml.safe_load(self.yaml_path.read_text()) or {}
        except FileNotFoundError:
            raise DeepAlignError(f"{self.root}: not a deepalign project (no {PROJECT_FILE}); run deepalign init or simulate first")
        except yaml.YAMLError as e:
            raise DeepAlignError(f"{self.yaml_path}: not valid YAML ({str(e).splitlines()[0]})")
        if not isinstance(state, dict):
            raise DeepAlignError(f"{self.yaml_path}: not a deepalign project file (expected a mapping)")
        state.setdefault("inputs", {})
        state.setdefault("config", {})
        state.setdefault("stages", {})
        return state

    def _write(self, state: dict) -> None:
        write_text_atomic(self.yaml_path, yaml.safe_dump(state, sort_keys=False))

    def update(self, change) -> dict:
        """Apply `change(state)` (mutating the dict) under the lock; returns the new state."""
        with self._locked():
            state = self._read()
            change(state)
            self._write(state)
        return state

    @property
    def state(self) -> dict:
        """The current contents of project.yaml (re-read on every access)."""
        return self._read()

    # ------------------------------------------------------------------------------ life cycle
    @classmethod
    def create(
        cls,
        root: Path | str,
        particles_star: Path | str | None = None,
        angpix: float | None = None,
        config: DeepAlignConfig | None = None,
        box: int | None = None,
    ) -> "Project":
        """Create PROJECT/ and project.yaml (or reopen an existing project with the same inputs).

        With a particle STAR, its pixel size (or `angpix`, which overrides it) and box are checked
        now, so a missing pixel size fails before any stage runs.
        """
        proj = cls(root)
        try:
            proj.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DeepAlignError(f"{proj.root}: cannot create project folder ({e.strerror})")
        inputs: dict[str, Any] = {}
        if particles_star is not None:
            inputs = _describe_particles(Path(particles_star), angpix, box)
        elif angpix is not None or box is not None:
            inputs = {"particles_star": None, "pixel_size_ang": angpix, "box_px": box}

        def init(state: dict) -> None:
            old = state.get("inputs") or {}
            if old.get("particles_star") and inputs.get("particles_star") and old["particles_star"] != inputs["particles_star"]:
                raise DeepAlignError(
                    f"{proj.root}: already a deepalign project for {old['particles_star']}; use a new project folder"
                )
            state["deepalign_project"] = FORMAT_VERSION
            state.setdefault("created_at", _now())
            state["inputs"] = {**old, **{k: v for k, v in inputs.items() if v is not None}}
            if config is not None:
                state["config"] = {**state.get("config", {}), **_plain(config)}

        with proj._locked():
            state = proj._read() if proj.yaml_path.exists() else {"inputs": {}, "config": {}, "stages": {}}
            init(state)
            proj._write(state)
        return proj

    @classmethod
    def open(cls, root: Path | str) -> "Project":
        """Open an existing project; error when PROJECT/project.yaml is missing."""
        proj = cls(root)
        if not proj.yaml_path.is_file():
            raise DeepAlignError(f"{proj.root}: not a deepalign project (no {PROJECT_FILE}); run deepalign init or simulate first")
        proj._read()
        return proj

    # --------------------------------------------------------------------------------- inputs
    @property
    def inputs(self) -> dict:
        return dict(self.state["inputs"])

    @property
    def particles_star(self) -> Path | None:
        p = self.inputs.get("particles_star")
        return Path(p) if p else None

    @property
    def pixel_size_ang(self) -> float | None:
        return self.inputs.get("pixel_size_ang")

    @property
    def box_px(self) -> int | None:
        return self.inputs.get("box_px")

    def set_inputs(self, particles_star: Path | str | None = None, pixel_size_ang: float | None = None, box_px: int | None = None, **extra) -> None:
        """Record inputs (e.g. `simulate` records the STAR it wrote); None values are left unchanged."""
        values = {"particles_star": str(Path(particles_star).resolve()) if particles_star is not None else None,
                  "pixel_size_ang": float(pixel_size_ang) if pixel_size_ang is not None else None,
                  "box_px": int(box_px) if box_px is not None else None, **extra}

        def change(state: dict) -> None:
            state["inputs"].update({k: v for k, v in values.items() if v is not None})

        self.update(change)

    # --------------------------------------------------------------------------------- config
    def stage_config(self, stage: str) -> dict | None:
        """The config section recorded for a stage (plain dict), or None."""
        return self.state["config"].get(stage)

    def record_config(self, stage: str, config: BaseModel | dict) -> None:
        plain = _plain(config)

        def change(state: dict) -> None:
            state["config"][stage] = plain

        self.update(change)

    # --------------------------------------------------------------------------------- stages
    def n_regions(self) -> int:
        """Number of regions the label stage split the sphere (or asymmetric unit) into."""
        n = self.stage("label").get("n_regions")
        if n is None:
            raise DeepAlignError(f"{self.root}: label stage has no region count; rerun deepalign label --force")
        return int(n)

    def stage_dir(self, name: str) -> Path:
        """PROJECT/<name>/ (created)."""
        path = self.root / name
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DeepAlignError(f"{path}: cannot create stage folder ({e.strerror})")
        return path

    def stage(self, name: str) -> dict:
        """The stage record ({} when the stage never finished)."""
        return dict(self.state["stages"].get(name) or {})

    def is_done(self, stage: str) -> bool:
        return bool(self.stage(stage).get("done", False))

    def mark_done(self, stage: str, outputs: Iterable[Path | str] = (), seconds: float | None = None, config: BaseModel | dict | None = None, **extra) -> None:
        """Record a finished stage: outputs (paths, stored relative to PROJECT when inside it),
        wall time in seconds, and optionally the stage's config.

        A ``shards_done`` list is merged, under the lock, with the one already recorded: two
        shards that finish at the same moment may both find every region written and both mark
        the stage done, each with the list it read earlier; the union keeps both."""
        rel = []
        for p in outputs:
            p = Path(p)
            try:
                rel.append(str(p.resolve().relative_to(self.root)))
            except ValueError:
                rel.append(str(p.resolve()))
        record = {"done": True, "finished_at": _now(), "seconds": None if seconds is None else round(float(seconds), 3), "outputs": rel, **extra}
        plain = _plain(config)

        def change(state: dict) -> None:
            if "shards_done" in record:
                earlier = (state["stages"].get(stage) or {}).get("shards_done") or []
                record["shards_done"] = sorted(set(earlier) | set(record["shards_done"] or []))
            state["stages"][stage] = record
            if plain is not None:
                state["config"][stage] = plain

        self.update(change)

    def mark_not_done(self, stage: str) -> None:
        """Forget that a stage finished (before a --force rerun)."""

        def change(state: dict) -> None:
            state["stages"].pop(stage, None)

        self.update(change)

    def update_stage(self, stage: str, **fields) -> None:
        """Merge fields into a stage record under the lock (e.g. shards finished so far)."""

        def change(state: dict) -> None:
            entry = state["stages"].setdefault(stage, {"done": False})
            entry.update(fields)

        self.update(change)

    def require_not_done(self, stage: str, force: bool) -> None:
        """Error when the stage already finished, unless force (then it is marked not done)."""
        if not self.is_done(stage):
            return
        if not force:
            raise DeepAlignError(f"{self.root}: stage '{stage}' already done; use --force to redo")
        self.mark_not_done(stage)

    def require_done(self, stage: str) -> None:
        """Error naming the command to run when a prerequisite stage has not finished."""
        if not self.is_done(stage):
            raise DeepAlignError(f"{self.root}: run deepalign {stage} first (stage '{stage}' is not done)")

    def output(self, stage: str, name: str) -> Path:
        """PROJECT/<stage>/<name>, checked to exist (error names the stage to run)."""
        path = self.root / stage / name
        if not path.exists():
            raise DeepAlignError(f"{path}: not found; run deepalign {stage} first")
        return path


def _describe_particles(star_path: Path, angpix: float | None, box: int | None) -> dict:
    """inputs entry for a particle STAR: absolute path, pixel size, box."""
    from . import star as star_io
    from .mrc import parse_image_name, stack_info

    table = star_io.read_particles(star_path)
    if angpix is not None:
        table = star_io.with_pixel_size(table, angpix)
    pixel = star_io.pixel_size(table)
    if box is None:
        box = star_io.box_size(table)
    if box is None and "rlnImageName" in table.particles:
        _, stack = parse_image_name(str(table.particles["rlnImageName"].iloc[0]))
        stack_path = Path(stack) if Path(stack).is_absolute() else star_io.image_base_dir(table) / stack
        if stack_path.exists():
            box = stack_info(stack_path)[1]
    return {
        "particles_star": str(star_path.resolve()),
        "pixel_size_ang": float(pixel),
        "box_px": None if box is None else int(box),
        "n_particles": len(table),
    }
