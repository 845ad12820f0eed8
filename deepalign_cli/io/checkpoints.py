"""Region checkpoints: one self-contained msgpack file per region (network, best weights, history).

PROJECT/train/region_007.msgpack   final (best-epoch) model of region 7, or a 'skipped' record
PROJECT/train/resume/region_007.msgpack   last finished epoch, for `train --resume`
"""

from __future__ import annotations

from pathlib import Path

from ..core.training import params_from_bytes, params_to_bytes
from ..errors import DeepAlignError
from .atomic import write_bytes_atomic


def region_file(train_dir: Path, region: int) -> Path:
    return Path(train_dir) / f"region_{int(region):03d}.msgpack"


def resume_file(train_dir: Path, region: int) -> Path:
    tag = "shared" if region < 0 else f"{int(region):03d}"
    return Path(train_dir) / "resume" / f"region_{tag}.msgpack"


def write_entry(path: Path, entry: dict) -> None:
    write_bytes_atomic(path, params_to_bytes(entry))


def read_entry(path: Path) -> dict:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DeepAlignError(f"{path}: cannot read checkpoint ({e.strerror})")
    try:
        entry = params_from_bytes(data)
    except Exception:
        raise DeepAlignError(f"{path}: not a deepalign checkpoint (corrupt or truncated); rerun deepalign train --regions for it")
    if not isinstance(entry, dict) or "params" not in entry:
        raise DeepAlignError(f"{path}: not a deepalign region checkpoint")
    return entry


def existing_regions(train_dir: Path) -> list[int]:
    out = []
    for p in Path(train_dir).glob("region_*.msgpack"):
        try:
            out.append(int(p.stem.split("_")[1]))
        except ValueError:
            continue
    return sorted(out)
