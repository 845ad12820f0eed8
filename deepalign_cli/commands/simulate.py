"""Simulate a particle data set with known poses: the embedded demo and our benchmark generator.

Examples:

    deepalign simulate demo                               # shipped 70S ribosome map, 2000 particles
    deepalign simulate sim --map emd_1234.mrc --angpix 1.1 --n-particles 20000 --snr 0.05
    deepalign simulate sim --config configs/demo.yaml --box 48 --force
    deepalign simulate real --map emd_11007.mrc --snr 0.03 --noise-micrograph micrograph.mrc   # real ice noise

Writes PROJECT/simulated/: particles.mrcs, particles.star (all particles, CTF, no poses: the set to
align), truth.star (the same with the true poses), subset.star (the --pre-aligned-fraction with true
poses: what RELION/cryoSPARC/Xmipp would give for ~10 %), map.mrc (the map at the particles' box),
and creates the project with particles.star as its input.

Noise: white Gaussian by default; with --noise-micrograph, crops of a real micrograph (resampled to
the particles' pixel size from its header's; each crop at a random position, turned by k·90°,
mirrored at random, normalised, then scaled to --snr like the white noise): real ice, the
micrograph's own CTF and neighbouring particles, as close to real data as simulation gets here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import typer

from ..errors import DeepAlignError
from ..io import mrc, star
from ..io.atomic import staged_dir
from ..io.project import Project
from ._common import CONFIG_OPT, FORCE_OPT, PROJECT_ARG, Timer, check_can_run, console, progress, removed_on_failure, stage_config

SHIPPED_MAP_PIXEL_ANG = 5.0  # ASPIRE's tutorials use 5 Å/px for this 65³ map (deepalign_cli/data/README.md)


def shipped_map() -> Path:
    return Path(str(resources.files("deepalign_cli") / "data" / "ribosome70S_65.mrc"))


def load_map(path: Path | None, angpix: float | None) -> tuple[np.ndarray, float]:
    """The map and its voxel size (Å): --angpix overrides the header; the shipped map is 5 Å."""
    if path is None:
        vol, _ = mrc.read_map(shipped_map())
        return vol, angpix or SHIPPED_MAP_PIXEL_ANG
    vol, voxel = mrc.read_map(path)
    pixel = angpix or voxel
    if not pixel:
        raise DeepAlignError(f"{path}: the header has no voxel size; pass --angpix")
    return vol, float(pixel)


def load_noise_micrograph(path: Path, pixel_out_ang: float, box: int) -> np.ndarray:
    """The micrograph at the particles' pixel size (its header's pixel size; a one-line error when
    it has none or is smaller than the box once resampled)."""
    from ..core import simulate

    image, pixel = mrc.read_image(path)
    if not pixel:
        raise DeepAlignError(f"{path}: the header has no pixel size; the noise micrograph must be resampled to the particles' pixel")
    mic = simulate.resample_micrograph(image, pixel, pixel_out_ang)
    if min(mic.shape) < box:
        raise DeepAlignError(f"{path}: {image.shape[1]}×{image.shape[0]} px at {pixel:.3f} Å/px is {mic.shape[1]}×{mic.shape[0]} px at the "
                             f"particles' {pixel_out_ang:.3f} Å/px, smaller than the {box}-px box")
    return mic


def output_box(box_px: int | None, n_map: int) -> int:
    """The particles' box: --box, else the map's (minus one when odd: RELION needs an even box)."""
    out_box = box_px or (n_map if n_map % 2 == 0 else n_map - 1)
    if out_box > n_map:
        raise DeepAlignError(f"--box {out_box}: larger than the map's box {n_map}")
    if out_box % 2:
        raise DeepAlignError(f"--box {out_box}: RELION needs an even box")
    return out_box


def check_new_project(project: Path, force: bool) -> None:
    """Simulate into a new folder, or redo (--force) a project that simulate made."""
    if not Project(project).yaml_path.exists():
        return
    proj = Project.open(project)
    check_can_run(proj, "simulate", force)
    ours = (Path(project) / "simulated" / "particles.star").resolve()
    if proj.particles_star is not None and proj.particles_star != ours:
        raise DeepAlignError(f"{proj.root}: already a deepalign project for {proj.particles_star}; simulate into a new project folder")


CHUNK = 4096  # particles simulated and written per step (bounds memory)


def simulate_stack(path: Path, vol_box: np.ndarray, pixel_out: float, sim, mic: np.ndarray | None) -> dict:
    """Simulate sim.n_particles into the MRC stack at `path`, a chunk at a time (progress shown).
    Returns the drawn parameters: eulers_deg (n, 3), origins_px (n, 2), defocus_u/v_ang,
    defocus_angle_deg (n,)."""
    import jax

    from ..core import simulate

    key, n, box = jax.random.PRNGKey(sim.seed), sim.n_particles, vol_box.shape[0]
    parts = []
    with mrc.StackWriter(path, n, box, pixel_out) as writer, progress() as bar:
        task = bar.add_task("simulate", total=n, rate="")
        for start in range(0, n, CHUNK):
            r = simulate.simulate_particles(
                jax.random.fold_in(key, start), vol_box, min(CHUNK, n - start), pixel_out, snr=sim.snr,
                defocus_range_ang=(sim.defocus_min_ang, sim.defocus_max_ang), astigmatism_ang=sim.astigmatism_ang,
                voltage_kv=sim.voltage_kv, cs_mm=sim.cs_mm, amplitude_contrast=sim.amplitude_contrast,
                bfactor_ang2=sim.bfactor_ang2, max_shift_px=sim.max_shift_px, ctf=sim.ctf, noise_micrograph=mic,
            )
            writer.write(start, r.pop("images"))
            parts.append(r)
            bar.update(task, completed=start + len(r["eulers_deg"]))
    keys = ("eulers_deg", "origins_px", "defocus_u_ang", "defocus_v_ang", "defocus_angle_deg")
    return {k: np.concatenate([r[k] for r in parts]) for k in keys}


def write_tables(folder: Path, drawn: dict, pixel_out: float, box: int, sim) -> int:
    """truth.star, particles.star (no poses) and subset.star (the pre-aligned fraction, true
    poses) of the simulated stack. Returns the subset's size."""
    n = len(drawn["eulers_deg"])
    names = [f"{i + 1:06d}@simulated/particles.mrcs" for i in range(n)]
    ctf = None
    if sim.ctf:
        ctf = dict(defocus_u_ang=drawn["defocus_u_ang"], defocus_v_ang=drawn["defocus_v_ang"], defocus_angle_deg=drawn["defocus_angle_deg"],
                   voltage_kv=sim.voltage_kv, cs_mm=sim.cs_mm, amplitude_contrast=sim.amplitude_contrast)
    truth = star.make_table(names, drawn["eulers_deg"], drawn["origins_px"] * pixel_out, pixel_out, box, ctf=ctf)
    star.write_particles(folder / "truth.star", truth)
    star.write_particles(folder / "particles.star", star.make_table(names, None, None, pixel_out, box, ctf=ctf))
    n_sub = max(1, int(round(sim.pre_aligned_fraction * n)))
    subset_idx = np.sort(np.random.default_rng(sim.seed).choice(n, n_sub, replace=False))
    star.write_particles(folder / "subset.star",
                         star.ParticleTable(truth.particles.iloc[subset_idx].reset_index(drop=True), truth.optics, truth.source))
    return n_sub


def command(
    project: Path = PROJECT_ARG,
    map_path: Path = typer.Option(None, "--map", help="3D map (MRC); default: the shipped 70S ribosome", show_default=False),
    angpix: float = typer.Option(None, "--angpix", help="map voxel size in Å (overrides the header)", show_default=False),
    n_particles: int = typer.Option(None, "--n-particles", "-n", show_default=False),
    box: int = typer.Option(None, "--box", help="particle box in px (Fourier crop of the map; even)", show_default=False),
    snr: float = typer.Option(None, "--snr", show_default=False),
    noise_micrograph: Path = typer.Option(None, "--noise-micrograph", help="MRC micrograph whose crops are the noise (real ice "
                                          "and CTF; default white Gaussian)", show_default=False),
    pre_aligned_fraction: float = typer.Option(None, "--pre-aligned-fraction", show_default=False),
    no_ctf: bool = typer.Option(False, "--no-ctf", help="no CTF (phase-flipped-like clean contrast)"),
    seed: int = typer.Option(None, "--seed", show_default=False),
    config: Path = CONFIG_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Simulate particles (CTF, noise, known poses) from a map into a new project."""
    from ..core import preprocess

    flags = dict(n_particles=n_particles, box_px=box, snr=snr, pre_aligned_fraction=pre_aligned_fraction, seed=seed,
                 pixel_size_ang=angpix, ctf=False if no_ctf else None,
                 noise_micrograph=None if noise_micrograph is None else str(Path(noise_micrograph).resolve()))
    cfg, sim = stage_config(config, "simulate", **flags)
    vol, pixel = load_map(map_path, sim.pixel_size_ang)
    out_box = output_box(sim.box_px, vol.shape[0])
    pixel_out = pixel * vol.shape[0] / out_box
    mic = load_noise_micrograph(Path(sim.noise_micrograph), pixel_out, out_box) if sim.noise_micrograph else None
    check_new_project(project, force)

    sim_dir = Path(project) / "simulated"
    with removed_on_failure(project), Timer() as t:
        vol_box = np.asarray(preprocess.fourier_crop_volume(vol, out_box)) if out_box != vol.shape[0] else vol
        with staged_dir(sim_dir) as tmp:
            drawn = simulate_stack(tmp / "particles.mrcs", vol_box, pixel_out, sim, mic)
            n_sub = write_tables(tmp, drawn, pixel_out, out_box, sim)
            mrc.write_map(tmp / "map.mrc", vol_box, pixel_out)
        proj = Project.create(project, particles_star=sim_dir / "particles.star", config=cfg)
        proj.record_config("regions", cfg.regions)
    proj.mark_done("simulate", outputs=[sim_dir / f for f in ("particles.mrcs", "particles.star", "truth.star", "subset.star", "map.mrc")],
                   seconds=t.seconds, config=sim)
    n = sim.n_particles
    noise = f"noise from {Path(sim.noise_micrograph).name}" if sim.noise_micrograph else "white noise"
    console.print(f"[green]simulated[/green] {n} particles, {out_box} px at {pixel_out:.3f} Å/px, SNR {sim.snr} ({noise}), "
                  f"{'CTF' if sim.ctf else 'no CTF'} → {sim_dir}/ (subset of {n_sub} pre-aligned) in {t.seconds:.1f} s")
