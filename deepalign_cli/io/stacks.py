"""Check, from MRC headers only, that a particle table's images can be read before any stage runs.

`init` (the particle STAR) and `label` (the pre-aligned subset) call `check_stacks`, so a STAR
naming a stack that is missing, of another box or shorter than the indices it names fails at once,
not hours later in `align`. Stack paths are resolved as `ParticleSource` will resolve them:
relative names against `star.image_base_dir` (the STAR's folder, up to 3 parents, or the current
folder), absolute names as they are. Each stack's header is read once (no image data), so 10⁵
particles in a few stacks take a fraction of a second.

The error is one line naming the table's file and its first failing particle (1-based row):

    particles.star: particle 1 (1@./batch_0_restacked.mrc): stack not found (/data/batch_0_restacked.mrc)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DeepAlignError
from . import star
from .mrc import parse_image_name, stack_info


def _parse(names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], tuple[int, str] | None]:
    """(stack id per particle, 1-based index per particle, stack names in order of first use,
    (row, problem) of the first unparsable name or None). Parsing stops at that name."""
    stack_ids, indices, stacks, lookup = [], [], [], {}
    for row, name in enumerate(names):
        try:
            index, stack = parse_image_name(name)
        except DeepAlignError as e:
            problem = str(e).removeprefix(f"{str(name).strip()}: ")
            return np.array(stack_ids, np.int64), np.array(indices, np.int64), stacks, (row, problem)
        sid = lookup.get(stack)
        if sid is None:
            sid = lookup[stack] = len(stacks)
            stacks.append(stack)
        stack_ids.append(sid)
        indices.append(index)
    return np.array(stack_ids, np.int64), np.array(indices, np.int64), stacks, None


def _header_problem(path: Path, box_px: int | None, box_from: str) -> tuple[int, int, str | None]:
    """(n_images, box) of the stack at `path` and the problem with it (None when it is readable and
    its images are `box_px` px; `box_from` says where that box comes from)."""
    if not path.exists():
        return 0, 0, f"stack not found ({path})"
    try:
        count, box, _ = stack_info(path)
    except DeepAlignError as e:
        return 0, 0, str(e)
    if box_px is not None and box != box_px:
        return count, box, f"{path} holds {box} px images but {box_from}"
    return count, box, None


def check_stacks(table: star.ParticleTable, box_px: int | None = None) -> None:
    """Every particle's stack exists, is an MRC stack of square `box_px` images (the optics group's
    rlnImageSize; None: all stacks share the first one's box) and holds the particle's index.

    Raises DeepAlignError naming the table's file and the first failing particle."""
    names = star.image_names(table)
    stack_ids, indices, stacks, first_bad = _parse(names)
    base = star.image_base_dir(table) if stacks else Path(".")
    first_use = np.unique(stack_ids, return_index=True)[1]  # stacks are numbered in order of first use
    largest = np.zeros(len(stacks), np.int64)
    np.maximum.at(largest, stack_ids, indices)
    first_box = None  # the stack the box was taken from, when the table has no rlnImageSize
    for sid, label in enumerate(stacks):
        if first_bad is not None and first_use[sid] > first_bad[0]:
            break  # every later stack is first used after the failure already found
        path = Path(label) if Path(label).is_absolute() else base / label
        box_from = (f"rlnImageSize is {box_px}" if first_box is None
                    else f"{first_box} holds {box_px} px; all particles need one box size")
        count, box, problem = _header_problem(path, box_px, box_from)
        if problem is not None:
            row = int(first_use[sid])
        elif largest[sid] > count:
            row = int(np.flatnonzero((stack_ids == sid) & (indices > count))[0])
            problem = f"image {indices[row]} requested but {path} holds {count}"
        else:
            if box_px is None:
                box_px, first_box = box, path
            continue
        if first_bad is None or row < first_bad[0]:
            first_bad = (row, problem)
    if first_bad is not None:
        row, problem = first_bad
        raise DeepAlignError(f"{table.source}: particle {row + 1} ({names[row]}): {problem}")
