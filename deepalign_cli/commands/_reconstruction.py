"""Helpers shared by the stages that use maps (`align`, `reconstruct`, `refine`, `train` with
synthetic examples): the project's preprocess config, a streamed reconstruction of a particle set,
the reference at the working geometry, and the project's regions (so that no command module
imports another)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from ..config import PreprocessConfig, ReconstructConfig, RegionConfig
from ..core import gallery, preprocess, reconstruction, regions
from ..core import mask as mask_mod
from ..errors import DeepAlignError
from ..io import mrc, star
from ..io.project import Project
from ..particles import ParticleSource, check_against_project
from ._common import console, progress, stage_config
from .symmetry_arg import operators_for

REFERENCE_PIXEL_TOLERANCE = 0.01  # relative voxel-size mismatch accepted after resampling
IMAGE_CHUNK_BUDGET_GB = 1.0  # prepared images held at once; the (2N)³ grids come on top


def align_geometry(source: ParticleSource, pre: PreprocessConfig, al) -> gallery.SearchGeometry:
    """align's search geometry for particles prepared by `pre` (AlignConfig `al`; `align` and refine's global pass)."""
    return gallery.search_geometry(source.box, source.pixel_ang, lowpass_resolution_ang=al.lowpass_resolution_ang,
                                   target_resolution_ang=pre.target_resolution_ang, angular_step_deg=al.angular_step_deg,
                                   psi_step_deg=al.psi_step_deg, min_margin_deg=al.region_margin_deg)


def project_preprocess(proj: Project, config_path: Path | None) -> PreprocessConfig:
    """The preprocess config images are prepared with: the --config file's when given, else the
    one the project recorded (so align sees what train/predict saw), else the defaults. A --config
    that differs from the recorded one gets a warning (the working images would differ)."""
    recorded = proj.stage_config("preprocess")
    if config_path is None:
        return PreprocessConfig.model_validate(recorded) if recorded else PreprocessConfig()
    _, pre = stage_config(config_path, "preprocess")
    if recorded and PreprocessConfig.model_validate(recorded) != pre:
        console.print(f"[yellow]warning:[/yellow] {config_path}: preprocess differs from the one recorded in {proj.yaml_path}; "
                      "images are prepared as the config says")
    return pre


def reconstruct_particles(source: ParticleSource, eulers_deg: np.ndarray, origins_ang: np.ndarray, rec: ReconstructConfig,
                          description: str = "reconstruct") -> dict:
    """Half maps and full map (working box and pixel) of the particles of `source`, streamed.

    eulers_deg: (n, 3) RELION angles.  origins_ang: (n, 2) RELION origins in Å.
    Returns dict: map, half1, half2 ((N, N, N) float32), freqs (cycles/px), fsc, resolution_ang.
    """
    n, pixel = len(source), source.pixel_ang
    perm = np.asarray(jax.random.permutation(jax.random.PRNGKey(rec.seed), n))
    half = np.zeros(n, int)
    half[perm[n // 2 :]] = 1
    origins_px = np.asarray(origins_ang, float) / pixel
    ctf_all = source.ctf_params()
    if n < 2:
        raise DeepAlignError(f"{source.table.name}: {n} particle; two half sets need at least 2")
    grids = [None, None]
    t0, done = time.perf_counter(), 0
    with progress(transient=True) as bar:
        task = bar.add_task(description, total=n, rate="")
        for idx, images in source.iter_chunks(source.chunk_size(IMAGE_CHUNK_BUDGET_GB)):
            for h in (0, 1):
                local = np.flatnonzero(half[idx] == h)
                if len(local) == 0:
                    continue
                rows = idx[local]
                ctf = None if ctf_all is None else source.ctf_params(rows)
                num, wt = reconstruction.backproject(images[local], eulers_deg[rows], origins_px[rows], ctf, pixel)
                grids[h] = (num, wt) if grids[h] is None else (grids[h][0] + num, grids[h][1] + wt)
            done += len(idx)
            bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.0f} particles/s")

    def finish(num, wt):
        return np.asarray(reconstruction.finalize(num, wt, box=source.box, wiener_constant=rec.wiener_constant))

    half1, half2 = finish(*grids[0]), finish(*grids[1])
    full = finish(grids[0][0] + grids[1][0], grids[0][1] + grids[1][1])
    freqs, curve = reconstruction.fsc(half1, half2)
    return {"map": full, "half1": half1, "half2": half2, "freqs": freqs, "fsc": curve,
            "resolution_ang": reconstruction.resolution_at(freqs, curve, pixel)}


def reference_at_working_geometry(path: Path, box: int, pixel_ang: float, quiet: bool = False) -> np.ndarray:
    """A user map brought to the particles' working box and pixel (Fourier crop, then centre crop/pad)."""
    vol, voxel = mrc.read_map(path)
    if not voxel:
        raise DeepAlignError(f"{path}: the header has no voxel size; set it (e.g. relion_image_handler --angpix) to {pixel_ang:g} Å")
    n_map = vol.shape[0]
    if voxel > pixel_ang * (1 + REFERENCE_PIXEL_TOLERANCE):
        raise DeepAlignError(f"{path}: voxel size {voxel:g} Å is coarser than the particles' working pixel {pixel_ang:g} Å; "
                             f"give a map at ≤ {pixel_ang:g} Å/px or a preprocess.target_resolution_ang ≥ {3 * voxel:g}")
    n_new = min(n_map, int(round(n_map * voxel / pixel_ang)))
    resampled = voxel * n_map / n_new
    if abs(resampled - pixel_ang) > REFERENCE_PIXEL_TOLERANCE * pixel_ang:
        raise DeepAlignError(f"{path}: {n_map} px at {voxel:g} Å cannot be Fourier-cropped to the working pixel {pixel_ang:g} Å "
                             f"(nearest: {n_new} px at {resampled:.4g} Å); resample the map to {pixel_ang:g} Å/px first")
    if not quiet and ((n_new, n_map) != (box, box) or abs(voxel - pixel_ang) > 1e-4 * pixel_ang):
        console.print(f"[yellow]notice:[/yellow] reference {path.name} ({n_map} px, {voxel:g} Å) resampled to the particles' "
                      f"working {box} px at {pixel_ang:g} Å (Fourier crop to {n_new} px, then centre {'crop' if n_new > box else 'pad'})")
    if n_new != n_map:
        vol = np.asarray(preprocess.fourier_crop_volume(vol, n_new))
    return preprocess.centre_crop_or_pad_volume(vol, box)


def fsc_csv(freqs_per_ang: np.ndarray, curve: np.ndarray) -> str:
    """fsc.csv text: shell, frequency (1/Å), resolution (Å), FSC."""
    rows = ["shell,frequency_per_ang,resolution_ang,fsc"]
    rows += [f"{i},{fa:.6f},{(1 / fa if fa > 0 else float('inf')):.3f},{c:.6f}" for i, (fa, c) in enumerate(zip(freqs_per_ang, curve))]
    return "\n".join(rows) + "\n"


class Reference(NamedTuple):
    """A reference at the particles' working geometry.

    map: (N, N, N) float32.  description: where it came from (summary.json).
    fsc: (N//2 + 1,) FSC between its two half maps at the working box, or None when it has none.
    """

    map: np.ndarray
    description: str
    fsc: np.ndarray | None = None


def half_maps_of(path: Path) -> tuple[Path, Path] | None:
    """(half1.mrc, half2.mrc) beside a deepalign map.mrc (`reconstruct` and `refine` write the
    three together), else None."""
    path = Path(path)
    halves = (path.parent / "half1.mrc", path.parent / "half2.mrc")
    return halves if path.name == "map.mrc" and all(h.is_file() for h in halves) else None


def _reference_from_file(path: Path, source: ParticleSource, description: str) -> Reference:
    vol = reference_at_working_geometry(path, source.box, source.pixel_ang)
    halves = half_maps_of(path)
    if halves is None:
        return Reference(vol, description)
    h1, h2 = (reference_at_working_geometry(h, source.box, source.pixel_ang, quiet=True) for h in halves)
    return Reference(vol, description, reconstruction.fsc(h1, h2)[1])


def load_reference(proj: Project, path: Path | None, source: ParticleSource, pre: PreprocessConfig, config_path: Path | None) -> Reference:
    """The reference at the working geometry: --reference, the project's reference, or one built now
    from the labelled subset; with the FSC of its half maps when it has them (:func:`half_maps_of`)."""
    if path is not None:
        if not Path(path).is_file():
            raise DeepAlignError(f"{path}: reference map not found")
        return _reference_from_file(Path(path), source, str(Path(path).resolve()))
    default = proj.root / "reconstruct" / "reference" / "map.mrc"
    if default.is_file():
        return _reference_from_file(default, source, str(default))
    labels = proj.output("label", "labels.star")
    console.print(f"[yellow]notice:[/yellow] no {default.relative_to(proj.root)}; reconstructing the reference from {labels.relative_to(proj.root)} "
                  f"now (keep it with: deepalign reconstruct {proj.root} --from {labels} --out reference)")
    _, rec = stage_config(config_path, "reconstruct")
    subset = star.read_particles(labels)
    eulers, origins = star.get_poses(subset, hint="the labelled subset needs poses")
    sub_source = ParticleSource(subset, pre)
    check_against_project(sub_source, proj, labels)
    result = reconstruct_particles(sub_source, eulers, origins, rec, description="reference")
    console.print(f"reference from {len(subset)} labelled particles: {result['resolution_ang']:.1f} Å at FSC 0.143")
    return Reference(result["map"], f"on the fly from {labels}", result["fsc"])


def search_reference(ref: Reference, pixel_ang: float, geo: gallery.SearchGeometry, lowpass_resolution_ang: float | None,
                     mask: np.ndarray | None = None) -> tuple[np.ndarray, float, str]:
    """(map to search with, the score's band limit in Å, how the map was filtered and masked).

    A reference with half maps is weighted shell by shell by their FSC (``reconstruction.fsc_weights``)
    and scored over the whole band it supports (to the working box's Nyquist where every shell
    correlates): noisy shells count for what they are worth instead of being cut at a guessed
    resolution. A map without halves, or an explicit align.lowpass_resolution_ang, is low-passed to
    the search geometry's resolution and scored to it. Measured (benchmarks/RESULTS.md, "align: an
    FSC-weighted reference"): equal or better within 5° on every data set tried, never worse.

    The filtered map is then multiplied by `mask` (at the working geometry, values in [0, 1]), else
    by ``core.mask.solvent_mask`` of the filtered map itself: the reference's solvent noise would
    otherwise be projected onto every image (benchmarks/RESULTS.md, "align: a masked reference":
    78.0 → 87.5 % within 5° on EMD-11007 with real noise, 89.1 → 97.6 % on the C1 ribosome)."""
    if ref.fsc is None or lowpass_resolution_ang:
        vol = np.asarray(preprocess.lowpass_volume(ref.map, pixel_ang, geo.resolution_ang))
        band, how = geo.resolution_ang, f"low-passed to {geo.resolution_ang:.1f} Å"
    else:
        vol = reconstruction.shell_filter(ref.map, reconstruction.fsc_weights(ref.fsc))
        band, how = reconstruction.supported_resolution_ang(ref.fsc, ref.map.shape[0], pixel_ang), "weighted by its half maps' FSC"
    if mask is None:
        mask = mask_mod.solvent_mask(vol, pixel_ang)
        how += f", times a solvent mask made from it ({100 * mask.mean():.1f} % of the box)"
    else:
        how += f", times the given mask ({100 * mask.mean():.1f} % of the box)"
    return (vol * mask).astype(np.float32), band, how


def mask_at_working_geometry(path: Path, box: int, pixel_ang: float) -> np.ndarray:
    """A user mask (any box and voxel size a reference may have) at the working box and pixel,
    values clipped to [0, 1]; one with no positive value is an error."""
    if not Path(path).is_file():
        raise DeepAlignError(f"{path}: mask not found")
    mask = np.clip(reference_at_working_geometry(Path(path), box, pixel_ang, quiet=True), 0.0, 1.0)
    if not mask.max() > 0:
        raise DeepAlignError(f"{path}: the mask holds no positive values")
    return mask


def project_region_config(proj: Project, cfg) -> RegionConfig:
    """The region settings `label` recorded (else the config's regions section)."""
    reg_dict = proj.stage_config("regions")
    return RegionConfig.model_validate(reg_dict) if reg_dict else cfg.regions


def project_regions(proj: Project, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(region centres (R, 3), symmetry operators (G, 3, 3)) of the regions `label` recorded (else the config's)."""
    reg = project_region_config(proj, cfg)
    ops, _ = operators_for(reg.symmetry, option="regions.symmetry")
    return regions.region_centres(reg.spacing_deg, ops), ops
