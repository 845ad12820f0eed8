"""Region checkpoints: one self-contained msgpack file per region (network, best weights, history).

PROJECT/train/region_007.msgpack   final (best-epoch) model of region 7, or a 'skipped' record
PROJECT/train/resume/region_007.msgpack   last finished epoch, for `train --resume`
PROJECT/train/resume/region_shared.msgpack   the same for a one-net model (its regions train as one unit)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.serialization
import numpy as np

from ..errors import DeepAlignError
from .atomic import write_bytes_atomic


def region_file(train_dir: Path, region: int) -> Path:
    return Path(train_dir) / f"region_{int(region):03d}.msgpack"


def resume_file(train_dir: Path, unit: int | str) -> Path:
    """Resume state of a training unit: a region, or a one-net model's unit (`core.training.TRUNK`)."""
    tag = f"{int(unit):03d}" if isinstance(unit, (int, np.integer)) else "shared"
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


def params_to_bytes(model_state: dict) -> bytes:
    """msgpack bytes of a region entry or training state (arrays, numbers, strings, None, lists).

    Self-contained: an entry from `core.training.train_regions` carries its "arch", so
    `params_from_bytes(b)` alone rebuilds the network."""
    return flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(_plain(model_state)))


def params_from_bytes(data: bytes, template: Any | None = None) -> Any:
    """Inverse of `params_to_bytes`. Without template: nested dicts of numpy arrays (lists come
    back as lists); with one: the template's structure (e.g. an optax state) filled in."""
    raw = flax.serialization.msgpack_restore(data)
    if template is None:
        return _unplain(raw)
    return flax.serialization.from_state_dict(_plain(template), raw)


_LIST_TAG = "__list__"


def _plain(x):
    """Lists → tagged dicts (msgpack keeps dict keys, flax turns lists into index dicts)."""
    if isinstance(x, list):
        return {_LIST_TAG: {str(i): _plain(v) for i, v in enumerate(x)}}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


def _unplain(x):
    if isinstance(x, dict):
        if set(x) == {_LIST_TAG}:
            items = x[_LIST_TAG]
            return [_unplain(items[k]) for k in sorted(items, key=int)]
        return {k: _unplain(v) for k, v in x.items()}
    return x
