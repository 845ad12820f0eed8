"""Benchmark: `predict` and `align` on a particle stack larger than the memory they are given.

    .venv/bin/python benchmarks/large_stack.py                        # 100,000 × 128² float32 (6.1 GiB)
    .venv/bin/python benchmarks/large_stack.py --quick                # 20,000 particles (1.2 GiB), 500 aligned
    .venv/bin/python benchmarks/large_stack.py --align-particles 4000 --keep   # keep WORKDIR
    .venv/bin/python benchmarks/large_stack.py --box 314 --n-particles 20000 --align-particles 500 \
        --out benchmarks/results/large_stack_314.json                    # the paper's spike box (7.3 GiB)

Steps (all through the real CLI, in WORKDIR, default /tmp/deepalign_large_stack):

1. `deepalign simulate` 400 particles at 64 px (the shipped 70S map, CTF, SNR 0.1), Fourier-padded
   here to 128 px (2.54 Å/px); a small project on them is labelled and trained with a tiny config
   (60° regions → 12, working pixel 10 Å → 32 px, 1 epoch) so that `predict` has nets.
2. The big stack: N images written chunk by chunk with `io.mrc.StackWriter` (each image one of the
   400 padded particles plus fresh-looking noise drawn from a bank of 64 noise images), so the
   writer holds one chunk at a time; a STAR lists them. The big project reuses the small one's
   label and train stages.
3. `deepalign predict BIG --memory-budget-gb 1` over all N particles, and `deepalign align SUB
   --memory-budget-gb 1` over every k-th particle (SUB: a project of --align-particles particles
   spread over the whole stack, with their predictions; aligning all N takes hours on 2 CPU cores,
   the time is extrapolated linearly from the particles/s).

Each command runs in its own process; its resident memory is read from /proc/PID/status every
0.1 s (VmHWM = peak RSS, and the largest RssAnon/RssFile seen; RssFile includes ~200 MiB of shared
libraries). getrusage(RUSAGE_CHILDREN).ru_maxrss is reported too, but it is the largest of all
children so far (the training run included). The stack and its memory maps are file-backed: the
readers and the writer unmap every chunk after use (io/mrc.py), so the pages count in the page
cache, not in the process's RSS. Writes benchmarks/results/large_stack.json (`_harness.write_result`)
and deletes WORKDIR (unless --keep). Needs about 1.1 × the stack size free on WORKDIR's disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import write_result  # noqa: E402

from deepalign_cli.io import mrc, star  # noqa: E402
from deepalign_cli.io.project import Project  # noqa: E402

BOX_PX = 128
QUICK_PARTICLES, QUICK_ALIGNED = 20_000, 500
SIM_BOX_PX = 64  # simulate's largest even box from the 65-px shipped map; padded to BOX_PX here
N_SIM = 400
NOISE_BANK = 64
NOISE_SIGMA = 1.0  # relative to the simulated particles' std
WRITE_CHUNK = 1024  # images per StackWriter chunk (64 MiB at 128 px)
MEMORY_BUDGET_GB = 1.0
POLL_S = 0.1
CONFIG = """
regions: {spacing_deg: 60, symmetry: C1}
preprocess: {target_resolution_ang: 30}
train: {epochs: 1, images_per_region: 64, batch_size: 32, early_stopping_patience: 0, min_positives: 1}
predict: {batch_size: 512}
align: {angular_step_deg: 15, psi_step_deg: 15, max_shift_px: 2, refine: false}
"""


def deepalign(*args) -> list[str]:
    return [sys.executable, "-m", "deepalign_cli.main", *map(str, args)]


def run_quiet(*args) -> None:
    r = subprocess.run(deepalign(*args), capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    if r.returncode:
        sys.exit(f"deepalign {' '.join(map(str, args))} failed:\n{r.stderr}")


def _status_kib(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def measured(*args) -> dict:
    """Run `deepalign ARGS`; wall time and memory (MiB) of that process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(deepalign(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        for k, v in _status_kib(proc.pid).items():
            if k in peak:
                peak[k] = max(peak[k], v)
        time.sleep(POLL_S)
    err = proc.stderr.read()
    if proc.returncode:
        sys.exit(f"deepalign {' '.join(map(str, args))} failed:\n{err}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib_polled": round(peak["VmHWM"] / 1024, 1),
            "peak_rss_anon_mib": round(peak["RssAnon"] / 1024, 1), "peak_rss_file_mib": round(peak["RssFile"] / 1024, 1),
            "ru_maxrss_all_children_so_far_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "last_line": err.strip().splitlines()[-1] if err.strip() else ""}


def fourier_pad(images: np.ndarray, box: int) -> np.ndarray:
    """(n, m, m) → (n, box, box) by zero-padding the centred spectrum (same field of view)."""
    n, m, _ = images.shape
    ft = np.fft.fftshift(np.fft.fft2(images), axes=(1, 2))
    out = np.zeros((n, box, box), np.complex128)
    s = box // 2 - m // 2
    out[:, s : s + m, s : s + m] = ft
    return (np.fft.ifft2(np.fft.ifftshift(out, axes=(1, 2))).real * (box / m) ** 2).astype(np.float32)


def retarget(table: star.ParticleTable, rows: np.ndarray, stack: Path, pixel_ang: float, box_px: int,
             index: np.ndarray | None = None) -> star.ParticleTable:
    """Rows of `table` pointing at images index+1 of `stack` (absolute path), at a new pixel size and box."""
    df = table.particles.iloc[rows].reset_index(drop=True).copy()
    index = np.arange(len(rows)) if index is None else index
    df["rlnImageName"] = [f"{i + 1}@{stack}" for i in index]
    optics = table.optics.copy()
    optics["rlnImagePixelSize"] = pixel_ang
    if "rlnImageSize" in optics:
        optics["rlnImageSize"] = box_px
    return star.ParticleTable(df, optics, table.source)


def adopt_stages(dst: Path, src: Path, stages=("label", "train")) -> None:
    """Give project dst the label/train outputs and records of project src (same particles' geometry)."""
    for s in stages:
        shutil.copytree(src / s, dst / s)
    old = yaml.safe_load((src / "project.yaml").read_text())

    def change(state):
        for s in stages:
            state["stages"][s] = old["stages"][s]
        for section in ("regions", "preprocess", "train", "label"):
            if section in old["config"]:
                state["config"][section] = old["config"][section]

    Project(dst).update(change)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-particles", type=int, default=100_000)
    ap.add_argument("--align-particles", type=int, default=2000, help="particles aligned (every k-th of the stack)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_PARTICLES:,} particles, {QUICK_ALIGNED} aligned")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/deepalign_large_stack"))
    ap.add_argument("--keep", action="store_true", help="keep WORKDIR")
    ap.add_argument("--box", type=int, default=BOX_PX, help="stack box (px); 314 = the paper's spike case")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/large_stack.json)")
    a = ap.parse_args()
    if a.quick:
        a.n_particles, a.align_particles = QUICK_PARTICLES, QUICK_ALIGNED
    box = a.box

    w = a.workdir
    need = a.n_particles * box * box * 4
    if w.exists():
        shutil.rmtree(w)
    w.mkdir(parents=True)
    free = shutil.disk_usage(w).free
    if free < 1.1 * need:
        sys.exit(f"{w}: {free / 2**30:.1f} GiB free, the stack needs {need / 2**30:.1f} GiB")
    cfg = w / "bench.yaml"
    cfg.write_text(CONFIG)
    timings = {}
    try:
        # 1. small simulated set, padded to the box, trained
        t0 = time.perf_counter()
        run_quiet("simulate", w / "sim", "--n-particles", N_SIM, "--box", SIM_BOX_PX, "--pre-aligned-fraction", 0.5, "--seed", 0)
        sim = w / "sim" / "simulated"
        parts, subset = star.read_particles(sim / "particles.star"), star.read_particles(sim / "subset.star")
        pixel = star.pixel_size(parts) * SIM_BOX_PX / box
        padded = fourier_pad(np.asarray(mrc.open_stack(sim / "particles.mrcs")), box)
        data = w / "data"
        data.mkdir()
        mrc.write_stack(data / "small.mrcs", padded, pixel)
        star.write_particles(data / "small.star", retarget(parts, np.arange(N_SIM), data / "small.mrcs", pixel, box))
        names = list(parts.particles["rlnImageName"])
        sub_rows = np.array([names.index(n) for n in subset.particles["rlnImageName"]])
        star.write_particles(data / "subset.star", retarget(subset, np.arange(len(sub_rows)), data / "small.mrcs", pixel, box, index=sub_rows))
        run_quiet("init", w / "small", "--particles", data / "small.star")
        run_quiet("label", w / "small", "--subset", data / "subset.star", "--config", cfg)
        run_quiet("train", w / "small", "--config", cfg)
        timings["prepare_small_project_s"] = round(time.perf_counter() - t0, 1)

        # 2. the big stack, written chunk by chunk
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal((NOISE_BANK, box, box)) * NOISE_SIGMA * padded.std()).astype(np.float32)
        n = a.n_particles
        with mrc.StackWriter(data / "big.mrcs", n, box, pixel) as writer:
            for start in range(0, n, WRITE_CHUNK):
                idx = np.arange(start, min(start + WRITE_CHUNK, n))
                shift = (idx // NOISE_BANK) % box  # rolled noise: 64 × 128 distinct patterns
                chunk = padded[idx % N_SIM] + np.stack([np.roll(noise[i % NOISE_BANK], s, axis=1) for i, s in zip(idx, shift)])
                writer.write(start, chunk)
        star.write_particles(data / "big.star", retarget(parts, np.arange(n) % N_SIM, data / "big.mrcs", pixel, box))
        timings["write_stack_s"] = round(time.perf_counter() - t0, 1)
        write_rss_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        stack_bytes = (data / "big.mrcs").stat().st_size
        big = w / "big"
        run_quiet("init", big, "--particles", data / "big.star")
        adopt_stages(big, w / "small")

        # 3. predict over the whole stack, align over every k-th particle
        predict = measured("predict", big, "--config", cfg, "--memory-budget-gb", MEMORY_BUDGET_GB)
        k = max(1, n // a.align_particles)
        rows = np.arange(0, n, k)[: a.align_particles]
        star.write_particles(data / "sub.star", retarget(parts, rows % N_SIM, data / "big.mrcs", pixel, box, index=rows))
        sub = w / "sub"
        run_quiet("init", sub, "--particles", data / "sub.star")
        adopt_stages(sub, w / "small", stages=("label",))
        pred = star.read_particles(big / "predict" / "predictions.star")
        star.write_particles(sub / "predict" / "predictions.star",
                             star.ParticleTable(pred.particles.iloc[rows].reset_index(drop=True), pred.optics, pred.source))
        align = measured("align", sub, "--config", cfg, "--reference", sim / "map.mrc", "--memory-budget-gb", MEMORY_BUDGET_GB)
        summary = json.loads((sub / "align" / "summary.json").read_text())
        align["n_particles"] = len(rows)
        align["particles_per_s"] = summary["particles_per_s"]
        align["every_kth_particle"] = int(k)
        align["extrapolated_all_particles_h"] = round(n / summary["particles_per_s"] / 3600, 2)
        predict["n_particles"] = n
        predict["particles_per_s"] = round(n / predict["seconds"], 1)

        out = {
            "meta": {"memory_budget_gb": MEMORY_BUDGET_GB, "workdir": str(w), "jax_platforms": os.environ.get("JAX_PLATFORMS", "cpu")},
            "stack": {"n_particles": n, "box_px": box, "pixel_ang": round(pixel, 4), "bytes": stack_bytes,
                      "gib": round(stack_bytes / 2**30, 2), "working_box_px": summary["working_box_px"]},
            "write": {"seconds": timings["write_stack_s"], "peak_rss_mib_this_process": write_rss_mib},
            "prepare_small_project_s": timings["prepare_small_project_s"],
            "predict": predict,
            "align": align,
        }
        print(json.dumps(out, indent=2))
        print(f"→ {write_result('large_stack', out, a.out)}")
    finally:
        if not a.keep:
            shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
