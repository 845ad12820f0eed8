"""`deepalign refine` against RELION 3.1.3 auto-refine on realistic data: an experimental map
(EMD-11007, SARS-CoV-2 RdRp, 120 px at 1.668 Å/px, Nyquist 3.34 Å), particles made by real
``relion_project --ctf`` and noise cut from a real micrograph.

    .venv/bin/python benchmarks/refine.py --quick                  # 1,000 particles, RELION on all
    .venv/bin/python benchmarks/refine.py --n-particles 3000 --relion-particles 1000
    .venv/bin/python benchmarks/refine.py --skip-relion --align-exhaustive

Measured on the 2-core CPU (2026-12-06, shared with other jobs, benchmarks/RESULTS.md): 3,000
particles with RELION on 1,000 took 65 min, 60 of them RELION's (11 iterations, three of them
global at 3.75°); data + deepalign + scoring ~5 min. RELION's time grows about linearly with K.

1. **Data** (`make_dataset`): the map as it is; N particles (``--n-particles``, default 10,000)
   with uniform random poses (C1), origins uniform in ±3 px, defocus 1.0–2.5 µm with ≤ 600 Å
   astigmatism (300 kV, Cs 2.7 mm, Q0 0.1) projected by ``relion_project --ctf``; noise = crops
   of ``fei_extended_1.668A_1024.mrc`` (same pixel; ``core.simulate.micrograph_noise``: random
   position, k·90° turn, mirror, each crop normalised) scaled to var(signal)/σ² = ``--snr``
   (0.03) over the stack; background normalised like relion_preprocess. A random 10 % is the
   labelled subset (true poses); every other particle is held out and scored. NB the crops come
   from one 1024² micrograph, so they overlap: the noise is partly shared between particles and
   FSCs against the truth are somewhat optimistic for every method alike.
2. **deepalign** through its CLI, each stage timed as a whole subprocess: init → label (30°
   regions) → train (``polar_trunk``, 4 × 1,024 images per region) → predict (``--coverage
   0.95``) → reconstruct the labelled subset (the reference) → align (20 Å target: 30 px working
   box at 6.67 Å/px, 7.5° step + local refinement) → ``deepalign refine PROJECT`` (default
   settings). ``--align-exhaustive``: ``align --exhaustive`` from the same reference instead of
   train + predict + align. (``reconstruct`` of the aligned poses also runs, for align's own map;
   it is not counted in either wall time.) deepalign never sees the true map.
3. **RELION** (Debian's 3.1.3): ``mpirun -n 3 relion_refine_mpi --auto_refine
   --split_random_halves`` (1 thread per rank on the 2 cores) from the **true map low-passed to
   30 Å** (``--ini_high 30 --firstiter_cc``: a reference deepalign does not get), ``--ctf
   --particle_diameter`` box·pixel·0.9 = 180 Å, ``--healpix_order 2`` (7.5°), auto-sampling down to
   local searches (``--auto_local_healpix_order 4``), offsets ±5 px in steps of 2 (as accuracy.py; RELION
   halves the step as it refines), ``--norm
   --scale --flatten_solvent --zero_mask``; on all particles or (``--relion-particles K``) a random
   subset of K of them.
4. **Scores.** Poses: full-rotation error against the truth (``core.evaluation``), median, % ≤ 2°,
   % ≤ 5°, median shift error, on the held-out particles (for RELION: its held-out particles; the
   deepalign rows are also scored on RELION's particles, in the JSON and, with K < N, as extra
   rows). Maps: FSC 0.5 and 0.143 against the true map of (a) every pose set reconstructed the same
   way (``relion_reconstruct --ctf`` at 120 px, all particles of the set) and (b) each method's own
   map (align: ``reconstruct/aligned/map.mrc`` at its 30 px working box; refine:
   ``refine/map.mrc``; RELION: ``run_class001.mrc``). Both unmasked. Wall time of each method
   (start-up and compilation included). With K < N, the true poses and align+refine poses are also
   reconstructed from RELION's K particles only, so its maps have a like-for-like ceiling.

Writes a markdown table to stdout and ``benchmarks/results/refine.json`` (``refine_quick.json``
with --quick) via `_harness.write_result`. Scratch (particles, projects, RELION runs, logs) stays
in --workdir. Helpers come from ``benchmarks/accuracy.py`` (imported: its import only applies
`configure_process` and puts benchmarks/ on sys.path); the ones tied to its 64-px ribosome
constants are generalised here.
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # before JAX starts (data making and scoring run JAX in this process)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import accuracy  # noqa: E402  (run_timed, deepalign_cmd, log, load_average, relion_reconstruct, constants)
from _harness import write_result  # noqa: E402

SHARED = Path("/work/shared/data")
MAP = SHARED / "rdrp_emd11007" / "emd11007_120px_1.668A.mrc"
MICROGRAPH = SHARED / "micrograph_noise" / "fei_extended_1.668A_1024.mrc"
SNR = 0.03
SYM = "C1"
MAX_ORIGIN_PX = accuracy.MAX_ORIGIN_PX  # 3
DEFOCUS_RANGE_ANG = accuracy.DEFOCUS_RANGE_ANG  # 1.0–2.5 µm
MAX_ASTIGMATISM_ANG = accuracy.MAX_ASTIGMATISM_ANG
OPTICS = accuracy.OPTICS
PRE_ALIGNED_FRACTION = accuracy.PRE_ALIGNED_FRACTION  # 10 %
REGION_SPACING_DEG = accuracy.REGION_SPACING_DEG  # 30°
TARGET_RESOLUTION_ANG = 20.0
REFERENCE_LOWPASS_ANG = accuracy.REFERENCE_LOWPASS_ANG  # 30 Å, RELION's reference
DIAMETER_FRACTION = 0.9  # RELION's --particle_diameter = box · pixel · 0.9
RELION_HEALPIX_ORDER = 2
COVERAGE = 0.95
THRESHOLDS = (0.5, 0.143)

log = accuracy.log
run_timed = accuracy.run_timed


def code_digests() -> dict:
    """sha256 (first 12 hex) of the refine code the run used (the JSON's git commit may be older)."""
    import hashlib

    root = HERE.parent / "deepalign_cli"
    files = ["commands/refine.py", "core/refinement.py", "core/search.py", "core/alignment.py", "core/score.py", "config.py"]
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in files if (root / f).exists()}


def deepalign_config() -> dict:
    """accuracy.py's settings (polar trunk, coverage 0.95) at a 20 Å target."""
    cfg = json.loads(json.dumps(accuracy.DEEPALIGN_CONFIG))
    cfg["regions"]["symmetry"] = SYM
    cfg["preprocess"]["target_resolution_ang"] = TARGET_RESOLUTION_ANG
    cfg["train"]["model"] = "polar_trunk"
    cfg["predict"] = {"coverage": COVERAGE}
    cfg.pop("refine", None)  # refine's defaults (Crowther diameter and mask = the 200 Å box), not accuracy.py's ribosome diameter
    return cfg


# ---------------------------------------------------------------------------------------------- data


def make_dataset(case_dir: Path, n: int, seed: int, snr: float, micrograph: Path) -> dict:
    """accuracy.make_dataset for a given map and pixel: truth map, relion_project particles with CTF
    + micrograph noise, particle/truth/subset STARs. Returns sizes and timings."""
    import jax

    from deepalign_cli.core import preprocess, simulate
    from deepalign_cli.io import mrc, star

    case_dir.mkdir(parents=True, exist_ok=True)
    vol, pixel = mrc.read_map(MAP)
    vol = np.asarray(vol, np.float32)
    box = int(vol.shape[0])
    mrc.write_map(case_dir / "truth_map.mrc", vol, pixel)

    rng = np.random.default_rng(seed)
    clean, eulers, origins_ang, ctf, project_s = accuracy.relion_project_particles(case_dir, rng, n, pixel, box, timeout=3600)
    sigma = float(np.sqrt(clean.var() / snr))
    image, mic_pixel = mrc.read_image(micrograph)
    mic = simulate.resample_micrograph(image, mic_pixel, pixel)
    noisy = np.empty_like(clean)
    key = jax.random.PRNGKey(seed + 1)
    for s in range(0, n, 2000):  # bounded memory
        key, sub = jax.random.split(key)
        m = min(2000, n - s)
        noise = np.asarray(simulate.micrograph_noise(sub, mic, m, box))
        noisy[s : s + m] = np.asarray(preprocess.normalize_background(clean[s : s + m] + sigma * noise, 0.75))
    del clean
    mrc.write_stack(case_dir / "particles.mrcs", noisy, pixel)
    (case_dir / "proj.mrcs").unlink()

    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    star.write_particles(case_dir / "particles.star", star.make_table(names, None, None, pixel, box, ctf=ctf))
    star.write_particles(case_dir / "truth.star", star.make_table(names, eulers, origins_ang, pixel, box, ctf=ctf))
    sub = np.sort(rng.choice(n, int(round(PRE_ALIGNED_FRACTION * n)), replace=False))
    sub_ctf = {k: (v[sub] if isinstance(v, np.ndarray) else v) for k, v in ctf.items()}
    star.write_particles(case_dir / "subset.star",
                         star.make_table([names[i] for i in sub], eulers[sub], origins_ang[sub], pixel, box, ctf=sub_ctf))
    return {"n_particles": n, "n_subset": int(sub.size), "snr": snr, "noise": str(micrograph), "map": str(MAP),
            "box_px": box, "pixel_ang": float(pixel), "relion_project_s": project_s}


def subset_star(src: Path, keep_from: Path, dest: Path) -> Path:
    """The rows of STAR `src` whose particles (matched by image name) are in STAR `keep_from`."""
    from deepalign_cli.core.consensus import match_by_name
    from deepalign_cli.io import star

    table, keep = star.read_particles(src), star.read_particles(keep_from)
    _, (i_src, _), _ = match_by_name([star.image_names(table), star.image_names(keep)])
    out = star.ParticleTable(table.particles.iloc[np.sort(i_src)].reset_index(drop=True),
                             None if table.optics is None else table.optics.copy(), table.source)
    star.write_particles(dest, out)
    return dest


# ------------------------------------------------------------------------------------------ deepalign


def run_deepalign(case_dir: Path, exhaustive: bool) -> dict:
    import yaml

    cfg = deepalign_config()
    cfg_path = case_dir / "deepalign.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    p = case_dir / "da"
    if p.exists():
        shutil.rmtree(p)
    da, c = accuracy.deepalign_cmd(), ["--config", str(cfg_path)]
    log_path = case_dir / "deepalign.log"
    log_path.write_text("")
    aligned = p / ("align_exhaustive" if exhaustive else "align") / "aligned.star"
    steps = [("init", ["init", p, "--particles", case_dir / "particles.star", *c]),
             ("label", ["label", p, "--subset", case_dir / "subset.star", "--sym", SYM, "--spacing", f"{REGION_SPACING_DEG:g}", *c])]
    if not exhaustive:
        steps += [("train", ["train", p, *c]), ("predict", ["predict", p, *c])]
    steps += [("reference", ["reconstruct", p, "--from", p / "label" / "labels.star", "--out", "reference", *c])]
    steps += [("align", ["align", p, "--exhaustive", *c] if exhaustive else ["align", p, *c])]
    steps += [("refine", ["refine", p, *c] + (["--from", aligned] if exhaustive else []))]
    steps += [("reconstruct_aligned", ["reconstruct", p, "--from", aligned, "--out", "aligned", *c])]
    seconds: dict = {}
    for name, args in steps:
        log(f"  deepalign {name} …")
        seconds[name] = run_timed([*da, *args], case_dir, log_path)
        log(f"  deepalign {name}: {seconds[name]:.1f} s")
    align_s = sum(v for k, v in seconds.items() if k not in ("refine", "reconstruct_aligned"))
    refine_summary = json.loads((p / "refine" / "summary.json").read_text())
    align_summary = json.loads(aligned.with_name("summary.json").read_text())
    out = {"config": cfg, "exhaustive": exhaustive, "stage_seconds": seconds,
           "wall_s": {"align": align_s, "align_refine": align_s + seconds["refine"]},
           "refine_summary": refine_summary,
           "align_summary": {k: align_summary.get(k) for k in ("mean_candidate_regions", "whole_unit_particles", "n_particles",
                                                              "angular_step_deg", "box_px", "pixel_ang") if k in align_summary},
           "poses": {"align": aligned, "align_refine": p / "refine" / "refined.star"},
           "own_maps": {"align": p / "reconstruct" / "aligned" / "map.mrc", "align_refine": p / "refine" / "map.mrc"}}
    cal = p / "predict" / "calibration.json"
    if cal.exists():
        out["calibration"] = json.loads(cal.read_text())
    return out


# --------------------------------------------------------------------------------------------- RELION


def run_relion(case_dir: Path, particles_star: Path, pixel: float, diameter_ang: float, reuse: bool = False) -> dict:
    """accuracy.run_relion's auto-refine (MPI, 3 ranks × 1 thread) on any particles and pixel.
    reuse: keep a finished run of the same command (relion/bench.json) instead of running again."""
    from deepalign_cli.core import preprocess
    from deepalign_cli.io import mrc

    vol, _ = mrc.read_map(case_dir / "truth_map.mrc")
    ref = np.asarray(preprocess.lowpass_volume(vol, pixel, REFERENCE_LOWPASS_ANG))
    mrc.write_map(case_dir / "reference_lp30.mrc", ref, pixel)
    out = case_dir / "relion"
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi",
           "--i", particles_star.name, "--o", "relion/run", "--ref", "reference_lp30.mrc",
           "--firstiter_cc", "--ini_high", f"{REFERENCE_LOWPASS_ANG:g}", "--ctf", "--particle_diameter", f"{diameter_ang:.0f}",
           "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--healpix_order", str(RELION_HEALPIX_ORDER),
           "--offset_range", "5", "--offset_step", "2", "--sym", SYM, "--norm", "--scale", "--pad", "2",
           "--dont_combine_weights_via_disc", "--pool", "3", "--j", "1",
           "--auto_refine", "--split_random_halves", "--auto_local_healpix_order", "4", "--low_resol_join_halves", "40"]
    done = out / "bench.json"
    if reuse and done.exists() and json.loads(done.read_text()).get("command") == " ".join(cmd) and (out / "run_data.star").exists():
        seconds = json.loads(done.read_text())["wall_s"]
        log(f"  relion_refine_mpi: reusing the finished run in {out} ({seconds:.1f} s)")
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        (case_dir / "relion.log").write_text("")
        log(f"  relion_refine_mpi --auto_refine on {particles_star.name} …")
        seconds = run_timed(cmd, case_dir, case_dir / "relion.log", timeout=6 * 3600, env=env)
        log(f"  relion_refine_mpi: {seconds:.1f} s")
        done.write_text(json.dumps({"command": " ".join(cmd), "wall_s": seconds}))
    data, own_map = out / "run_data.star", out / "run_class001.mrc"
    if not data.exists():
        raise RuntimeError(f"relion_refine finished without {data}; see {case_dir / 'relion.log'}")
    iters = sorted(out.glob("run_it*_half1_model.star"))
    model = out / "run_model.star"
    est = None
    if model.exists():
        m = re.search(r"_rlnCurrentResolution\s+([0-9.eE+-]+)", model.read_text())
        est = float(m.group(1)) if m else None
    return {"command": " ".join(cmd), "wall_s": seconds, "iterations": len(iters) - 1 if iters else None,
            "own_resolution_ang": est, "poses": data, "own_map": own_map}


# -------------------------------------------------------------------------------------------- scoring


def score_poses(star_path: Path, truth_path: Path, subset_path: Path, pixel: float, restrict: Path | None = None) -> dict:
    """accuracy.score_poses with the pixel given, % ≤ 2° added, optionally only the particles of
    STAR `restrict`. Held-out = not in the labelled subset."""
    from deepalign_cli.core import evaluation, symmetry
    from deepalign_cli.core.consensus import image_keys, match_by_name
    from deepalign_cli.io import star

    est, truth = star.read_particles(star_path), star.read_particles(truth_path)
    held = set(image_keys([star.image_names(star.read_particles(subset_path))])[0][0])
    common, (i_est, i_true), _ = match_by_name([star.image_names(est), star.image_names(truth)])
    truth_keys = image_keys([star.image_names(truth)])[0][0]
    keep = np.array([truth_keys[i] not in held for i in i_true])
    if restrict is not None:
        allowed = set(image_keys([star.image_names(star.read_particles(restrict))])[0][0])
        keep &= np.array([truth_keys[i] in allowed for i in i_true])
    i_est, i_true = i_est[keep], i_true[keep]
    e_est, o_est = star.get_poses(est)
    e_true, o_true = star.get_poses(truth)
    s = evaluation.angular_error_summary(e_est[i_est], e_true[i_true], symmetry.symmetry_operators(SYM))
    err = s.pop("errors_deg")
    s["within_2_pct"] = float(100 * np.mean(err <= 2))
    s["median_shift_error_px"] = float(np.median(evaluation.shift_error_px(o_est[i_est], o_true[i_true], pixel)))
    return s


def fsc_resolutions(map_path: Path, truth_vol: np.ndarray, truth_pixel: float) -> dict:
    """FSC of a map against the truth (Fourier-cropped to the map's box when smaller) at 0.5 and 0.143."""
    from deepalign_cli.core import preprocess, reconstruction
    from deepalign_cli.io import mrc

    vol, pixel = mrc.read_map(map_path)
    truth = truth_vol
    if vol.shape[0] != truth.shape[0]:
        truth = np.asarray(preprocess.fourier_crop_volume(truth, vol.shape[0]))
    pixel = pixel or truth_pixel * truth_vol.shape[0] / vol.shape[0]
    freqs, f = reconstruction.fsc(vol, truth)
    return {"fsc05_ang": reconstruction.resolution_at(freqs, f, pixel, 0.5),
            "fsc0143_ang": reconstruction.resolution_at(freqs, f, pixel, 0.143),
            "box": int(vol.shape[0]), "pixel_ang": float(pixel), "nyquist_ang": float(2 * pixel)}


# ----------------------------------------------------------------------------------------------- main


LABELS = {"truth": "true poses (ceiling)", "align": "deepalign align (20 Å)", "align_refine": "deepalign align + refine",
          "relion": "RELION 3.1.3 auto-refine", "truth_k": "true poses, RELION's particles only",
          "align_refine_k": "deepalign align + refine, RELION's particles only"}


def markdown(res: dict) -> str:
    d = res.get("deepalign", {})
    rl = res.get("relion", {})
    lines = ["| method | particles (scored) | median ° | ≤ 2° | ≤ 5° | shift err px | same recon. FSC 0.5 / 0.143 Å | own map FSC 0.5 / 0.143 Å | "
             "own half-set estimate Å | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in res["methods"].items():
        label = LABELS[m]
        if m == "align" and d.get("exhaustive"):
            label = "deepalign align --exhaustive (20 Å)"
        if m == "align_refine" and d.get("exhaustive"):
            label = "deepalign align --exhaustive + refine"
        if m == "relion":
            label += (f" ({rl.get('iterations')} it.; {rl['n_particles']} of {res['data']['n_particles']} particles"
                      f"{', random subset' if rl['n_particles'] < res['data']['n_particles'] else ''}; ref = true map low-passed to 30 Å)")
        same = f"{s['same_fsc05_ang']:.2f} / {s['same_fsc0143_ang']:.2f}" if "same_fsc05_ang" in s else "—"
        own = (f"{s['own_fsc05_ang']:.2f} / {s['own_fsc0143_ang']:.2f}" + (f" (Nyq {s['own_nyquist_ang']:.1f})" if s['own_nyquist_ang'] > 4 else "")
               if "own_fsc05_ang" in s else "—")
        est = f"{s['own_estimate_ang']:.2f}" if s.get("own_estimate_ang") else "—"
        wall = f"{s['wall_s']:.0f}" if s.get("wall_s") is not None else "—"
        if "median_deg" in s:
            pose = f"{s['median_deg']:.2f} | {s['within_2_pct']:.1f} % | {s['within_5_pct']:.1f} % | {s['median_shift_error_px']:.2f}"
        else:
            pose = "— | — | — | —"
        lines.append(f"| {label} | {s['n_particles']} ({s.get('n', '—')}) | {pose} | {same} | {own} | {est} | {wall} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-particles", type=int, default=None, help="particles (default 10,000; 1,000 with --quick)")
    ap.add_argument("--snr", type=float, default=SNR, help="var(signal) / var(noise) over the stack")
    ap.add_argument("--relion-particles", type=int, default=None, help="RELION on a random subset of K particles (default all)")
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--reuse-relion", action="store_true", help="keep WORKDIR's finished RELION run of the same command")
    ap.add_argument("--align-exhaustive", action="store_true", help="align --exhaustive instead of train + predict + align")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/deepalign_refine_bench"))
    ap.add_argument("--reuse-data", action="store_true", help="keep WORKDIR's particles when they match N, SNR and seed")
    ap.add_argument("--quick", action="store_true", help="1,000 particles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/refine[_quick].json)")
    args = ap.parse_args()

    from deepalign_cli.io import mrc

    needed = ["relion_project", "relion_reconstruct"] + ([] if args.skip_relion else ["mpirun", "relion_refine_mpi"])
    missing = [b for b in needed if shutil.which(b) is None]
    if missing:
        print(f"refine benchmark skipped: not found: {', '.join(missing)} (Debian's relion and openmpi-bin)")
        return 0
    for f in (MAP, MICROGRAPH):
        if not f.exists():
            print(f"refine benchmark skipped: {f} not found")
            return 0
    n = args.n_particles or (1000 if args.quick else 10000)
    k = min(args.relion_particles or n, n)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"workdir {work}; {n} particles, SNR {args.snr}, RELION on {k}")

    key = {"n_particles": n, "snr": args.snr, "seed": args.seed}
    old = json.loads((work / "data.json").read_text()) if (work / "data.json").exists() else None
    if args.reuse_data and old is not None and {k_: old.get(k_) for k_ in key} == key and (work / "particles.star").exists():
        data = old
    else:
        data = make_dataset(work, n, args.seed, args.snr, MICROGRAPH) | {"seed": args.seed}
        (work / "data.json").write_text(json.dumps(data))
    pixel, box = data["pixel_ang"], data["box_px"]
    diameter = round(box * pixel * DIAMETER_FRACTION)
    log(f"  data ready: {box} px at {pixel:.3f} Å, {data['n_subset']} labelled (relion_project {data['relion_project_s']:.0f} s)")
    truth_vol, _ = mrc.read_map(work / "truth_map.mrc")

    res: dict = {"data": data, "load_before": accuracy.load_average()}
    methods: dict = {"truth": {"wall_s": None, "n_particles": n}}
    poses: dict = {"truth": work / "truth.star"}
    own: dict = {}
    da = run_deepalign(work, args.align_exhaustive)
    res["deepalign"] = {k_: v for k_, v in da.items() if k_ not in ("poses", "own_maps")}
    rs = da["refine_summary"]
    log(f"  refine: {rs['input_resolution_ang']:.2f} → {rs['resolution_ang']:.2f} Å (half sets, FSC 0.143) in {rs['iterations']} "
        f"iterations, converged {rs['converged']}")
    for m in ("align", "align_refine"):
        methods[m] = {"wall_s": da["wall_s"][m], "n_particles": n}
        poses[m], own[m] = da["poses"][m], da["own_maps"][m]
    methods["align_refine"]["own_estimate_ang"] = rs["resolution_ang"]
    res["load_mid"] = accuracy.load_average()

    relion_star = None
    if not args.skip_relion:
        if k < n:
            rng = np.random.default_rng(args.seed + 7)
            from deepalign_cli.io import star

            table = star.read_particles(work / "particles.star")
            pick = np.sort(rng.choice(n, k, replace=False))
            sub = star.ParticleTable(table.particles.iloc[pick].reset_index(drop=True), table.optics.copy(), table.source)
            relion_star = work / f"particles_relion_{k}.star"
            star.write_particles(relion_star, sub)
        else:
            relion_star = work / "particles.star"
        rl = run_relion(work, relion_star, pixel, diameter, args.reuse_relion)
        res["relion"] = {"command": rl["command"], "iterations": rl["iterations"], "n_particles": k,
                         "particles": str(relion_star), "own_resolution_ang": rl["own_resolution_ang"]}
        methods["relion"] = {"wall_s": rl["wall_s"], "n_particles": k, "own_estimate_ang": rl["own_resolution_ang"]}
        poses["relion"], own["relion"] = rl["poses"], rl["own_map"]
    res["load_after"] = accuracy.load_average()

    restrict = relion_star if (relion_star is not None and k < n) else None
    if restrict is not None:  # like-for-like rows on RELION's particles
        methods["truth_k"] = {"wall_s": None, "n_particles": k}
        methods["align_refine_k"] = {"wall_s": None, "n_particles": k}
        (work / "maps").mkdir(exist_ok=True)
        poses["truth_k"] = subset_star(work / "truth.star", restrict, work / "maps" / "truth_k.star")
        poses["align_refine_k"] = subset_star(poses["align_refine"], restrict, work / "maps" / "align_refine_k.star")
    for m, path in poses.items():
        log(f"  scoring {m} …")
        s = methods[m]
        if m != "truth" and m != "truth_k":
            s.update(score_poses(path, work / "truth.star", work / "subset.star", pixel, restrict if m.endswith("_k") else None))
            if restrict is not None and m in ("align", "align_refine"):
                s["on_relion_particles"] = score_poses(path, work / "truth.star", work / "subset.star", pixel, restrict)
        t = time.perf_counter()
        rec = accuracy.relion_reconstruct(work, path, m, SYM)
        s["relion_reconstruct_s"] = time.perf_counter() - t
        f = fsc_resolutions(rec, truth_vol, pixel)
        s["same_fsc05_ang"], s["same_fsc0143_ang"] = f["fsc05_ang"], f["fsc0143_ang"]
        if m in own and own[m].exists():
            f = fsc_resolutions(own[m], truth_vol, pixel)
            s["own_fsc05_ang"], s["own_fsc0143_ang"], s["own_nyquist_ang"] = f["fsc05_ang"], f["fsc0143_ang"], f["nyquist_ang"]
        log(f"  {m}: same recon. {s['same_fsc05_ang']:.2f} / {s['same_fsc0143_ang']:.2f} Å")
    res["methods"] = methods

    tr, ar, rl_ = methods["truth"], methods["align_refine"], methods.get("relion")
    # FSC against the truth: 0.5 is the criterion comparable to the half-set 0.143; the 0.143 crossing
    # against the truth sits at or near Nyquist for every pose set here (the curves are not monotonic)
    goal = {f"refine_map_within_10pct_of_true_poses_{t}": ar[f"same_{t}_ang"] <= 1.1 * tr[f"same_{t}_ang"] for t in ("fsc05", "fsc0143")}
    goal |= {f"refine_own_map_within_10pct_of_true_poses_{t}": ar.get(f"own_{t}_ang", 1e9) <= 1.1 * tr[f"same_{t}_ang"]
             for t in ("fsc05", "fsc0143")}
    if "truth_k" in methods:
        goal["refine_map_within_10pct_of_true_poses_fsc05_relion_particles"] = (methods["align_refine_k"]["same_fsc05_ang"]
                                                                                  <= 1.1 * methods["truth_k"]["same_fsc05_ang"])
    if rl_:
        cmp = ar.get("on_relion_particles", ar)
        goal["align_refine_at_least_as_accurate_as_relion"] = (cmp["median_deg"] <= rl_["median_deg"]
                                                               and cmp["within_5_pct"] >= rl_["within_5_pct"])
        goal["align_refine_less_wall_time"] = ar["wall_s"] < rl_["wall_s"]
        goal["relion_particles_fraction"] = k / n
    res["goal"] = goal
    table = markdown(res)

    relion_version = subprocess.run(["relion_refine", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    meta = {"relion": relion_version[0] if relion_version else None, "quick": args.quick,
            "sizes": {"n_particles": n, "relion_particles": None if args.skip_relion else k, "box_px": box, "pixel_ang": pixel,
                      "pre_aligned_fraction": PRE_ALIGNED_FRACTION},
            "settings": {"snr": args.snr, "noise": str(MICROGRAPH), "map": str(MAP), "max_origin_px": MAX_ORIGIN_PX,
                         "defocus_range_ang": DEFOCUS_RANGE_ANG, "max_astigmatism_ang": MAX_ASTIGMATISM_ANG, **OPTICS,
                         "target_resolution_ang": TARGET_RESOLUTION_ANG, "coverage": COVERAGE, "align_exhaustive": args.align_exhaustive,
                         "relion_particle_diameter_ang": diameter, "relion_reference_lowpass_ang": REFERENCE_LOWPASS_ANG,
                         "relion_healpix_order": RELION_HEALPIX_ORDER, "seed": args.seed},
            "code_sha256": code_digests(), "argv": sys.argv, "total_s": time.perf_counter() - t0, "workdir": str(work)}
    out = write_result("refine_quick" if args.quick else "refine", {"meta": meta, "result": res, "table": table}, args.out)
    print(f"\n## refine against RELION auto-refine ({n} particles, {time.strftime('%Y-%m-%d %H:%M')})\n")
    print(table)
    print()
    hist = rs["history"]
    print("refine iterations: " + "; ".join(f"{h['iteration']}: {h['box_px']} px, {h['resolution_ang']:.2f} Å"
                                              + (f", step {h['angular_step_deg']:.2f}°, Δ {h['median_angle_change_deg']:.2f}°"
                                                 if "angular_step_deg" in h else "") + (" (global pass)" if h.get("global_pass") else "")
                                              + f", {h['seconds']:.0f} s" for h in hist)
          + (f"; written: iteration {rs['written_iteration']}" if rs.get("written_iteration", len(hist) - 1) != len(hist) - 1 else ""))
    print("stage seconds: " + ", ".join(f"{k_} {v:.1f}" for k_, v in da["stage_seconds"].items()))
    print(f"goal: {json.dumps(goal)}")
    print(f"\ntotal {meta['total_s']:.0f} s; results → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
