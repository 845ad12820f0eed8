"""Training speed with synthetic examples made inside the training step (issue 24), side by side.

    python benchmarks/synthetic_speed.py [--sizes 32 64 120] [--fractions 0 0.5 0.9] [--models polar_trunk per_region]

For each working box: the experimental map in ../shared/data/rdrp_emd11007/ (120 px, 1.668 Å/px)
Fourier-cropped to that box, 42 regions (30°, C1), 2,000 random normalised "labelled" images, a
`core.synthetic.Generator` with a CTF table of 1,000 particles (defocus 1–2.5 µm) and a coloured
noise spectrum; then `training.train_regions` with ``train.synthetic_fraction`` f for each f,
run back to back. Reported: training images per second through a net (per-region: one net's; the
trunk: its one net) over the epochs after the first (which compiles), and the wall time of the
whole 42-region run at the given budget (images per region × epochs, early stopping off,
validation included), i.e. what `deepalign train` spends on training.
Results: stdout (markdown) and benchmarks/results/synthetic_speed.json.
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # before JAX starts

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import preprocess, projector, regions, symmetry, synthetic, training  # noqa: E402
from deepalign_cli.io import mrc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import write_result  # noqa: E402

MAP = Path(__file__).resolve().parents[2] / "shared" / "data" / "rdrp_emd11007" / "emd11007_120px_1.668A.mrc"
N_LABELLED = 2000


def generator_at(box: int) -> tuple[synthetic.Generator, float]:
    vol, pixel = mrc.read_map(MAP)
    pixel_box = pixel * vol.shape[0] / box
    vol_ft = projector.prepare_volume(np.asarray(preprocess.fourier_crop_volume(vol, box)))
    ops = symmetry.symmetry_operators("C1")
    centres = regions.region_centres(30.0, ops)
    rng = np.random.default_rng(0)
    du = rng.uniform(10000, 25000, 1000)
    ctf = {"defocus_u_ang": du, "defocus_v_ang": du - 200, "defocus_angle_deg": rng.uniform(0, 180, 1000), "voltage_kv": 300.0,
           "cs_mm": 2.7, "amplitude_contrast": 0.1}
    k = np.arange(box // 2 + 1 + box // 4, dtype=float)
    power = 1.0 / (1.0 + (k / (box / 8)) ** 2) + 0.05
    power[0] = 0.0
    gen = synthetic.generator(vol_ft, centres, ops, pixel_ang=pixel_box, ctf_rows=synthetic.ctf_table(ctf, 1000), noise_power=power,
                              snr=0.25, max_shift_px=box / 32)
    return gen, pixel_box


def run(model: str, box: int, fraction: float, gen, ipr: int, epochs: int) -> dict:
    rng = np.random.default_rng(1)
    images = rng.normal(size=(N_LABELLED, box, box)).astype(np.float32)
    labels = rng.integers(0, 42, N_LABELLED)
    cfg = TrainConfig(model=model, images_per_region=ipr, epochs=epochs, early_stopping_patience=0, synthetic_fraction=fraction)
    epochs_seen = []
    t0 = time.perf_counter()
    training.train_regions(images, labels, range(42), cfg, jax.random.key(0), progress=lambda ev: epochs_seen.append(ev),
                           generator=gen if fraction else None)
    wall = time.perf_counter() - t0
    later = [ev for ev in epochs_seen if ev.get("event") == "epoch" and ev["epoch"] > 0]
    rate = sum(ev["images"] for ev in later) / max(sum(ev["seconds"] for ev in later), 1e-9)  # images through a net per second
    return {"model": model, "box_px": box, "synthetic_fraction": fraction, "images_per_region": ipr, "epochs": epochs,
            "images_per_s": rate, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 120])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.9])
    ap.add_argument("--models", nargs="+", default=["polar_trunk"], choices=["polar_trunk", "per_region"])
    ap.add_argument("--images-per-region", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    print("| model | box | synthetic share | training images/s | 42 regions, {} × {} (s) |".format(args.images_per_region, args.epochs))
    print("|---|---|---|---|---|")
    for box in args.sizes:
        gen, _ = generator_at(box)
        for model in args.models:
            for f in args.fractions:
                r = run(model, box, f, gen, args.images_per_region, args.epochs)
                rows.append(r)
                print(f"| {model} | {box} | {f:g} | {r['images_per_s']:,.0f} | {r['wall_s']:.1f} |", flush=True)
    write_result("synthetic_speed", {"settings": vars(args) | {"out": str(args.out)}, "results": rows}, args.out)


if __name__ == "__main__":
    main()
