"""Benchmark: restricted (top-k = 2 of 42 regions) vs exhaustive correlation search, same particles,
same run. Headline: the particles/s ratio (target ≥ 15×; the gallery-size ratio bounds it).

    .venv/bin/python benchmarks/align.py            # 64 and 120 px, both settings
    .venv/bin/python benchmarks/align.py --quick    # fewer particles, < 2 min on 2 CPU cores

Particles are simulated from the 70S ribosome map (5 Å/px; 64 px by Fourier cropping, 120 px by
zero-padding the 65 px map) with CTF, SNR 0.1 and origins ≤ 3 px. Two settings:

* ``spread`` (realistic): directions uniform over the sphere, so every one of the 42 regions is
  used; each particle's candidates are (its true region, the region whose centre is next closest
  to its direction) — what a good top-2 prediction gives. Many region groups, a few particles each.
* ``pairs`` (the first benchmark's setting): directions from two regions only, two groups.

Compilation is excluded (a warm-up call compiles the same programs). Three ratios are reported:
(1) this run end to end; (2) the **search** ratio — particles/s of the per-particle work
(features, coarse search, refinement; ``align_particles``' own step timings) — and (3) the
extrapolated ratio for a data set of 85,000 particles (the paper's ribosome): one projection of
the reference table (for the restricted search the galleries of all 42 regions with their margins,
1.2–1.5× the asymmetric unit, at the projection rate measured in the run) plus 85,000 × the
per-particle search time. The table projection is a one-time cost per call that a benchmark of a
few dozen particles cannot amortise, and "spread" with a few particles per region scores them in
pieces of 1–2 (low GEMM efficiency) where a real data set has thousands per region: "pairs"
(every particle in one of two region pairs, ≥ 16 per region) is the realistic density for the
per-particle rate. The margin follows ``deepalign align``'s rule, max(5°, 2 × covering radius × step). The restricted and
exhaustive runs of a row are back to back in one process (this machine's speed drifts by 2–3×
over minutes, so only ratios within a row are meaningful). Also reported: the gallery-size bound
on the ratio (mean over particles of |asymmetric unit| / |restricted gallery|), the achieved
FLOP/s of the coarse correlation program (XLA cost analysis ÷ measured time of one call) and a
matmul ceiling of this machine. The coarse GEMM's particle chunk is `search.coarse_chunk()` (32 on
CPU, 256 on accelerators; the sweep that chose 256 is in RESULTS.md, "On one GPU"). Writes a
markdown table to stdout and benchmarks/results/align.json (`_harness.write_result`).
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # before JAX starts

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import mrcfile  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import best_seconds, matmul_flops, write_result, xla_cost  # noqa: E402

from deepalign_cli.core import alignment, ctf, gallery, geometry, preprocess, projector, regions, score, search, symmetry  # noqa: E402

MAP = Path(os.environ.get("DEEPALIGN_DATA", "/work/shared/data")) / "ribosome70S_65.mrc"
PIXEL_ANG = 5.0
REGION_SPACING_DEG = 30.0  # 42 regions
REGION_PAIRS = ((9, 10), (20, 21))  # (true region, neighbour) per group, `pairs` setting
SNR = 0.1
MARGIN_DEG = 5.0
N_DATASET = 85_000  # the paper's ribosome data set, for the extrapolated whole-data-set ratio
CTF_KW = dict(voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)


def _map(box):
    vol = mrcfile.read(MAP).astype(np.float32)
    n = vol.shape[0]
    if box <= n:
        return np.asarray(preprocess.fourier_crop_volume(vol, box)), PIXEL_ANG * n / box
    out = np.zeros((box,) * 3, np.float32)
    s = box // 2 - n // 2
    out[s : s + n, s : s + n, s : s + n] = vol
    return out, PIXEL_ANG


def _particles(vol_ft, box, pixel, n, centres, ops, seed, setting):
    rng = np.random.default_rng(seed)
    if setting == "spread":
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        order = np.argsort(regions.direction_region_distances(dirs, centres, ops), axis=1)
        cands = order[:, :2]  # (true region, next-closest region)
    else:
        lattice = geometry.fibonacci_sphere(20000)
        label, _ = regions.assign_regions(lattice, centres, ops)
        dirs, cands = [], []
        for i in range(n):
            true, other = REGION_PAIRS[i % len(REGION_PAIRS)]
            inside = lattice[label == true]
            dirs.append(inside[rng.integers(len(inside))])
            cands.append((true, other))
        dirs, cands = np.array(dirs), np.array(cands)
    rot, tilt = geometry.direction_to_angles(dirs)
    eulers = np.stack([rot, tilt, rng.uniform(-180, 180, n)], axis=1)
    origins = rng.uniform(-3, 3, (n, 2)).astype(np.float32)
    defocus = rng.uniform(10000, 25000, n)
    c = np.asarray(ctf.ctf_2d(box, pixel, defocus, defocus, 0.0, **CTF_KW))
    ft = np.asarray(projector.project_ft(vol_ft, geometry.eulers_to_matrices(eulers).astype(np.float32), origins))
    images = np.asarray(preprocess.add_noise(jax.random.key(seed), np.real(np.fft.ifft2(ft * c)), SNR))
    params = dict(defocus_u_ang=defocus, defocus_v_ang=defocus, defocus_angle_deg=np.zeros(n), **CTF_KW)
    return images, eulers, origins, params, np.asarray(cands)


def _timed(images, vol_ft, cands, centres, ops, params, opts, exhaustive):
    """(output, wall seconds) of one call on all particles, after a warm-up call that compiles the
    same programs: all particles for the restricted search (its table shape depends on the regions
    used), min(n, 64) for the exhaustive one (same feature/refinement chunk sizes)."""

    def run(m):
        sub = {k: (v[:m] if np.ndim(v) else v) for k, v in params.items()}
        return alignment.align_particles(images[:m], vol_ft, cands[:m], centres, ops, ctf_params=sub, exhaustive=exhaustive, **opts)

    run(len(images) if not exhaustive else min(len(images), 64))  # warm-up: compiles the programs
    t = time.perf_counter()
    out = run(len(images))
    return out, time.perf_counter() - t


def _margin(step_deg):
    return max(MARGIN_DEG, 2 * gallery.COVERING_RADIUS_FACTOR * step_deg)  # as `deepalign align`


def _gallery_bound(cands, centres, ops, step_deg):
    """Mean over particles of |exhaustive gallery| / Σ |candidate region galleries| (the ratio's
    upper bound when the work is proportional to the number of references searched)."""
    lattice = gallery.sphere_lattice(step_deg)
    masks = gallery.region_gallery_masks(lattice, centres, ops, range(len(centres)), _margin(step_deg))
    au = len(gallery.region_gallery_indices(lattice, centres, ops, range(len(centres)), 0.0))
    sizes = np.array([masks[np.unique(c)].sum() for c in cands])
    return float(np.mean(au / sizes)), au, float(np.mean(sizes))


def _coarse_flops(vol_ft, box, pixel, opts, n_refs, b):
    """(FLOP per call from XLA's cost analysis, measured seconds per call) of the coarse program
    for b particles against n_refs cached references (one reference chunk)."""
    band = score.fourier_band(box, pixel, opts["lowpass_resolution_ang"])
    k = int(band.flat_index.shape[0])
    shifts = jnp.asarray(search.shift_disc(opts["max_shift_px"]))
    rng = np.random.default_rng(0)
    cf = jnp.asarray((rng.normal(size=(b, k)) + 1j * rng.normal(size=(b, k))).astype(np.complex64))
    c2 = jnp.ones((b, k), jnp.float32)
    inorm = jnp.ones((b,), jnp.float32)
    refs = jnp.asarray(rng.normal(size=(1, n_refs, 2 * k)).astype(np.float32))
    powers = jnp.ones((1, n_refs, k), jnp.float32)
    mask = jnp.ones((1, n_refs), bool)
    args = (cf, c2, inorm, refs, powers, mask, jnp.int32(0), jnp.int32(1), band, shifts)
    return xla_cost(search.coarse_search, *args)["flops"], best_seconds(search.coarse_search, *args)


def bench(box, n, step_deg, memory_gb, setting):
    vol, pixel = _map(box)
    if step_deg is None:  # `deepalign align`'s default: Crowther's step at the score's band limit
        step_deg = gallery.default_angular_step_deg(3 * pixel, box * pixel)
    vol_ft = projector.prepare_volume(vol)
    ops = symmetry.symmetry_operators("C1")
    centres = regions.region_centres(REGION_SPACING_DEG, ops)
    images, eulers, origins, params, cands = _particles(vol_ft, box, pixel, n, centres, ops, box, setting)
    opts = dict(pixel_size_ang=pixel, angular_step_deg=step_deg, psi_step_deg=step_deg, margin_deg=_margin(step_deg),
                max_shift_px=5.0, refine=True, lowpass_resolution_ang=3 * pixel, memory_budget_gb=memory_gb)
    bound, au, mean_gal = _gallery_bound(cands, centres, ops, step_deg)
    n_psi = len(search.psi_angles(step_deg))
    lattice = gallery.sphere_lattice(step_deg)
    all_region_refs = int(gallery.region_gallery_masks(lattice, centres, ops, range(len(centres)), _margin(step_deg)).sum()) * n_psi
    row = {"setting": setting, "box_px": box, "pixel_ang": pixel, "n_particles": n, "n_groups": len(np.unique(cands)),
           "step_deg": step_deg, "margin_deg": _margin(step_deg), "n_regions": len(centres), "gallery_ratio_bound": bound,
           "exhaustive_directions": au, "mean_restricted_directions": mean_gal,
           "table_refs": {"exhaustive": au * n_psi, "restricted_all_regions": all_region_refs}}
    truth = geometry.eulers_to_matrices(eulers)
    for mode, exhaustive in (("restricted", False), ("exhaustive", True)):
        out, seconds = _timed(images, vol_ft, cands, centres, ops, params, opts, exhaustive)
        err = geometry.rotation_distance_deg(geometry.eulers_to_matrices(out["eulers_deg"]), truth)
        steps = out["seconds"]
        search_s = steps["features"] + steps["coarse"] + steps["refine"]
        row[mode] = {
            "seconds": seconds,
            "step_seconds": steps,
            "particles_per_s": n / seconds,
            "search_particles_per_s": n / search_s,
            "median_error_deg": float(np.median(err)),
            "fraction_within_5deg": float(np.mean(np.asarray(err) <= 5.0)),
            "median_shift_error_px": float(np.median(np.linalg.norm(out["origins_px"] - origins, axis=1))),
        }
    rs, ex = row["restricted"], row["exhaustive"]
    row["speedup"] = rs["particles_per_s"] / ex["particles_per_s"]
    row["search_speedup"] = rs["search_particles_per_s"] / ex["search_particles_per_s"]
    # a data set of N particles: one projection of the table (all 42 regions' galleries for the
    # restricted search, at the projection rate measured here) + N × the per-particle search time
    ex_rate = row["table_refs"]["exhaustive"] / max(ex["step_seconds"]["project"], 1e-9)  # refs/s
    row["projection_refs_per_s"] = ex_rate
    total = {"exhaustive": row["table_refs"]["exhaustive"] / ex_rate + N_DATASET / ex["search_particles_per_s"],
             "restricted": all_region_refs / ex_rate + N_DATASET / rs["search_particles_per_s"]}
    row["dataset_particles"] = N_DATASET
    row["dataset_hours"] = {k: v / 3600 for k, v in total.items()}
    row["dataset_speedup"] = total["exhaustive"] / total["restricted"]
    flops, secs = _coarse_flops(vol_ft, box, pixel, opts, min(au * n_psi, 1024), 8)
    row["coarse_gflop_per_call"] = flops / 1e9
    row["coarse_gflops_per_s"] = flops / secs / 1e9
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer particles and a 5° step (< 3 min)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 120])
    ap.add_argument("--settings", nargs="+", default=["pairs", "spread"], choices=["spread", "pairs"])
    ap.add_argument("--step", type=float, default=None,
                    help="gallery and psi step (°); default: align's own default at 64 px (2.68°), 3° at 120 px")
    ap.add_argument("--memory-gb", type=float, default=8.0)
    ap.add_argument("--scale", type=int, default=1,
                    help="× the particle counts (a GPU needs thousands to amortise its per-call costs)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/align.json)")
    args = ap.parse_args()
    counts = {("pairs", 64): 64, ("pairs", 120): 32, ("spread", 64): 84, ("spread", 120): 42}
    steps = {64: None, 120: 3.0}  # align's default at 120 px (1.43°) costs ~17 s per exhaustive particle here
    if args.quick:
        counts = {k: max(16, v // 4) for k, v in counts.items()}
        steps = {64: 5.0, 120: 5.0}
    counts = {k: v * args.scale for k, v in counts.items()}
    rows = [bench(box, counts[(s, box)], args.step or steps.get(box), args.memory_gb, s) for s in args.settings for box in args.sizes]
    ceiling = matmul_flops()
    meta = {"quick": args.quick, "scale": args.scale, "coarse_chunk": search.coarse_chunk(), "matmul_ceiling_gflops": ceiling / 1e9}
    print(f"align benchmark ({os.cpu_count()} CPUs; coarse chunk {meta['coarse_chunk']}; "
          f"f32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s)\n")
    print("| setting | box | particles (region groups) | step / margin | restricted p/s: run / search | exhaustive p/s: run / search "
          "| ratio: this run / **search** / 85k-particle data set | gallery bound | ≤ 5° restr / exh | coarse GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rs, ex = r["restricted"], r["exhaustive"]
        print(f"| {r['setting']} | {r['box_px']} | {r['n_particles']} ({r['n_groups']}) | {r['step_deg']:.2f}° / {r['margin_deg']:.2f}° | "
              f"{rs['particles_per_s']:.2f} / {rs['search_particles_per_s']:.2f} | {ex['particles_per_s']:.3f} / {ex['search_particles_per_s']:.3f} | "
              f"{r['speedup']:.1f}× / **{r['search_speedup']:.1f}×** / {r['dataset_speedup']:.1f}× | {r['gallery_ratio_bound']:.1f}× | "
              f"{100 * rs['fraction_within_5deg']:.0f} % / {100 * ex['fraction_within_5deg']:.0f} % | {r['coarse_gflops_per_s']:.0f} |")
    print(f"→ {write_result('align', {'meta': meta, 'results': rows}, args.out)}")


if __name__ == "__main__":
    main()
