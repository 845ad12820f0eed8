"""Write SLURM array scripts that shard a stage over regions, plus a dependent merge job.

Examples:

    deepalign slurm ribo --stage train --shards 8 --partition gpu --gres gpu:1 --config configs/ribosome.yaml
    bash ribo/slurm/submit_train.sh          # sbatch the array, then the merge job after it
    deepalign slurm ribo --stage align --shards 4 --time 02:00:00

Each array task runs `deepalign <stage> PROJECT --regions <its regions>`; every region is in
exactly one shard, shards write only their own per-region files, and the merge job
(`deepalign <stage> PROJECT --merge`) checks that every region is there and finishes the stage.
Writes PROJECT/slurm/<stage>_array.sh, <stage>_merge.sh, submit_<stage>.sh and shards_<stage>.txt.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import typer

from ..errors import DeepAlignError
from ..io.atomic import write_text_atomic
from ..io.project import Project
from ..regionspec import format_regions
from ._common import CONFIG_OPT, PROJECT_ARG, console, stage_config

SHARDABLE = ("train", "align")


def shard_regions(n_regions: int, shards: int) -> list[list[int]]:
    """Split regions 0..n-1 into `shards` contiguous, balanced, non-empty groups."""
    shards = max(1, min(int(shards), n_regions))
    return [list(map(int, a)) for a in np.array_split(np.arange(n_regions), shards)]


def _executable() -> str:
    beside = Path(sys.executable).parent / "deepalign"
    if beside.exists():
        return shlex.quote(str(beside))
    exe = shutil.which("deepalign")
    if exe:
        return exe
    return f"{shlex.quote(sys.executable)} -m deepalign_cli.main"


def _check_shardable(stage: str, project: Path, config: Path | None) -> None:
    """Refuse a stage that cannot be sharded over regions (and a train model that is one network)."""
    if stage not in SHARDABLE:
        raise DeepAlignError(f"--stage {stage}: only {', '.join(SHARDABLE)} can be sharded; run predict/reconstruct as one job")
    if stage == "train":
        from ..core import models

        _, tc = stage_config(config, "train")
        if models.get(tc.model).one_net:
            raise DeepAlignError(f"--stage train: model {tc.model} is one network for all regions and trains as one job "
                                 f"(deepalign train {project}); only model per_region shards over regions")


def _labelled_project(project: Path) -> tuple[Project, int]:
    """The project and the region count its label stage recorded (an error when there is none)."""
    proj = Project.open(project)
    proj.require_done("label")
    n_regions = proj.stage("label").get("n_regions")
    if not n_regions:
        raise DeepAlignError(f"{proj.root}: the label stage recorded no region count; rerun deepalign label --force")
    return proj, n_regions


def _stage_command(stage: str, root: Path, config: Path | None) -> str:
    """`deepalign <stage> PROJECT [--config ...]`: the start of every task's command line."""
    exe = _executable()
    cfg = f" --config {shlex.quote(str(Path(config).resolve()))}" if config else ""
    return f"{exe} {stage} {shlex.quote(str(root))}{cfg}"


def _task_sbatch_lines(time_limit: str, cpus: int, mem: str, partition: str | None, gres: str | None) -> list[str]:
    """#SBATCH resource lines of every array task."""
    common = [f"#SBATCH --time={time_limit}", f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --mem={mem}"]
    if partition:
        common.append(f"#SBATCH --partition={partition}")
    if gres:
        common.append(f"#SBATCH --gres={gres}")
    return common


def _array_script(stage: str, specs: list[str], logs: Path, sbatch: list[str], stage_cmd: str, extra: str) -> str:
    """The array job: task i runs the stage on the regions of shard i."""
    args = f" {extra}" if extra else ""
    return "\n".join([
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=deepalign-{stage}",
        f"#SBATCH --array=0-{len(specs) - 1}",
        f"#SBATCH --output={logs}/{stage}_%A_%a.out",
        *sbatch,
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "SHARDS=(" + " ".join(f'"{s}"' for s in specs) + ")",
        f'{stage_cmd}{args} --regions "${{SHARDS[$SLURM_ARRAY_TASK_ID]}}"',
        "",
    ])


def _merge_script(stage: str, logs: Path, partition: str | None, stage_cmd: str) -> str:
    """The merge job: `deepalign <stage> PROJECT --merge` on one small task."""
    return "\n".join([
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=deepalign-{stage}-merge",
        f"#SBATCH --output={logs}/{stage}_merge_%j.out",
        "#SBATCH --time=01:00:00", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=8G",
        *( [f"#SBATCH --partition={partition}"] if partition else [] ),
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"{stage_cmd} --merge",
        "",
    ])


def _submit_script(stage: str, out: Path) -> str:
    """sbatch the array, then the merge job with afterok on it."""
    return "\n".join([
        "#!/usr/bin/env bash",
        "# Submit the shards as an array job and the merge job to run after all of them succeeded.",
        "set -euo pipefail",
        f'jid=$(sbatch --parsable {shlex.quote(str(out / f"{stage}_array.sh"))})',
        f'sbatch --dependency=afterok:"${{jid%%;*}}" {shlex.quote(str(out / f"{stage}_merge.sh"))}',
        "",
    ])


def _write_scripts(out: Path, stage: str, array: str, merge: str, submit: str, specs: list[str]) -> None:
    """Write the three scripts (executable) and the shard list, each atomically."""
    write_text_atomic(out / f"{stage}_array.sh", array)
    write_text_atomic(out / f"{stage}_merge.sh", merge)
    write_text_atomic(out / f"submit_{stage}.sh", submit)
    write_text_atomic(out / f"shards_{stage}.txt", "\n".join(specs) + "\n")
    for name in (f"{stage}_array.sh", f"{stage}_merge.sh", f"submit_{stage}.sh"):
        (out / name).chmod(0o755)


def command(
    project: Path = PROJECT_ARG,
    stage: str = typer.Option(..., "--stage", help="train or align (predict runs as one job)", show_default=False),
    shards: int = typer.Option(8, "--shards", min=1, help="array tasks"),
    partition: str = typer.Option(None, "--partition", show_default=False),
    gres: str = typer.Option(None, "--gres", help="e.g. gpu:1", show_default=False),
    time_limit: str = typer.Option("12:00:00", "--time", help="per task"),
    cpus: int = typer.Option(4, "--cpus-per-task", min=1),
    mem: str = typer.Option("24G", "--mem"),
    extra: str = typer.Option("", "--extra-args", help="extra arguments for every task, e.g. '--seed 1'"),
    config: Path = CONFIG_OPT,
) -> None:
    """Write SLURM array scripts that shard a stage over regions."""
    _check_shardable(stage, project, config)
    proj, n_regions = _labelled_project(project)
    specs = [format_regions(g) for g in shard_regions(int(n_regions), shards)]
    out = proj.root / "slurm"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stage_cmd = _stage_command(stage, proj.root, config)
    sbatch = _task_sbatch_lines(time_limit, cpus, mem, partition, gres)
    array = _array_script(stage, specs, logs, sbatch, stage_cmd, extra)
    merge = _merge_script(stage, logs, partition, stage_cmd)
    _write_scripts(out, stage, array, merge, _submit_script(stage, out), specs)
    console.print(f"[green]wrote[/green] {len(specs)} {stage} shards over {n_regions} regions → {out}/submit_{stage}.sh "
                  f"(regions per shard: {', '.join(specs)})")
