"""Particle images as the stages see them: read (memory-mapped, chunked) and prepared.

Preparation is the paper's: Fourier-crop to the working pixel size (target resolution / 3 when
`preprocess.target_resolution_ang` is set, else the input pixel) and RELION-style background
normalisation. train, predict and align all go through `ParticleSource`, so they see identical
images, and the working box/pixel are recorded in project.yaml by the first stage that runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import PreprocessConfig
from .core import preprocess
from .errors import DeepAlignError
from .io import mrc, star


@dataclass(frozen=True)
class Working:
    """Working geometry: box (px) and pixel size (Å) of prepared images."""

    box: int
    pixel_ang: float


def working_geometry(box_in: int, pixel_in_ang: float, pre: PreprocessConfig) -> Working:
    if pre.target_resolution_ang is None:
        return Working(int(box_in), float(pixel_in_ang))
    target = preprocess.target_pixel(pre.target_resolution_ang)
    m = preprocess.downsampled_box(int(box_in), float(pixel_in_ang), target)
    return Working(m, float(pixel_in_ang) * box_in / m)


class ParticleSource:
    """The images of a particle table, prepared chunk by chunk.

    table: ParticleTable (rlnImageName relative to the RELION project folder or the STAR's folder).
    pre: PreprocessConfig.  Memory: one chunk of raw + prepared images at a time.
    """

    def __init__(self, table: star.ParticleTable, pre: PreprocessConfig):
        self.table = table
        self.pre = pre
        self.reader = mrc.ImageReader(star.image_names(table), star.image_base_dir(table))
        self.pixel_in = star.pixel_size(table)
        self.working = working_geometry(self.reader.box, self.pixel_in, pre)

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def box(self) -> int:
        return self.working.box

    @property
    def pixel_ang(self) -> float:
        return self.working.pixel_ang

    def prepare(self, raw: np.ndarray, first_index: int = 0) -> np.ndarray:
        """Raw (k, L, L) → prepared (k, M, M) float32; NaN/inf images are an error naming the particle."""
        bad = ~np.isfinite(raw).all(axis=(1, 2))
        if bad.any():
            i = first_index + int(np.flatnonzero(bad)[0])
            name = self.table.particles["rlnImageName"].iloc[i]
            raise DeepAlignError(f"{name}: image contains NaN or inf values ({int(bad.sum())} such image(s) in this chunk)")
        x = raw
        if self.working.box != self.reader.box:
            x = preprocess.fourier_crop(x, self.working.box)
        if self.pre.normalize:
            x = preprocess.normalize_background(x, self.pre.bg_radius_frac)
        return np.asarray(x, dtype=np.float32)

    def read(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        # a NaN check needs the particle name: report the first one of the chunk
        return self.prepare(self.reader.read(idx), int(idx[0]) if idx.size else 0) if idx.size else np.zeros((0, self.box, self.box), np.float32)

    def iter_chunks(self, chunk_size: int, indices: np.ndarray | None = None):
        """Yield (indices (k,), prepared images (k, M, M)) over the table (or the given rows)."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        for s in range(0, len(idx), max(1, int(chunk_size))):
            sel = idx[s : s + chunk_size]
            raw = self.reader.read(sel)
            yield sel, self.prepare(raw, int(sel[0]))

    def chunk_size(self, memory_budget_gb: float, factor: float = 24.0) -> int:
        """Particles per chunk for a memory budget (factor ≈ working arrays per image)."""
        return mrc.chunk_size_for_budget(max(self.reader.box, self.box), memory_budget_gb * 2**30, factor)

    def ctf_params(self, rows: np.ndarray | None = None) -> dict | None:
        """Per-particle CTF parameters (numpy (k,) arrays) or None when the table has none."""
        p = star.get_ctf_params(self.table)
        if p is None:
            return None
        if rows is None:
            return p
        return {k: (np.asarray(v)[rows] if np.ndim(v) else v) for k, v in p.items()}


def check_against_project(source: ParticleSource, proj, path: Path) -> None:
    """Refuse particles whose box or pixel size differ from the project's (e.g. labels from another project)."""
    box, pixel = proj.box_px, proj.pixel_size_ang
    if box is not None and source.reader.box != box:
        raise DeepAlignError(f"{path}: images are {source.reader.box} px but the project's particles are {box} px (labels from another project?)")
    if pixel is not None and abs(source.pixel_in - pixel) > 1e-3 * pixel:
        raise DeepAlignError(f"{path}: pixel size {source.pixel_in:g} Å differs from the project's {pixel:g} Å")
