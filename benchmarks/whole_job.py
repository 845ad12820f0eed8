"""Whole training job: time to train all 42 region classifiers to the validation accuracy of the
paper's Keras recipe, same data, same CPU, one run.

    .venv/bin/python benchmarks/whole_job.py [--box 32] [--snr 0.5] [--keras-regions 3]

Data: labelled particles simulated from the shipped 70S map (CTF, noise at --snr, origins ≤ 2 px),
Fourier-cropped to --box px and background-normalised as `deepalign train` does; labels = the
region (42 regions, 30° spacing) of each true projection direction; the stratified 80/20
train/validation split of `train_regions` (same key) for every contender.

Contenders:
* **Keras recipe** (the paper's): one binary net per region, 10 epochs × 10,000 augmented images
  (balanced batches of 128, random rotation + shift — the batches are made by deepalign's own
  sampler/augmenter and handed to `train_on_batch`, whose time alone is counted, so Keras is not
  charged for augmentation), balanced validation accuracy after every epoch, best epoch kept.
  Trained on `--keras-regions` regions (the paper trains regions one after another and
  independently, so the 42-region time is 42 × the mean per-region time).
* **deepalign per-region** with the same recipe on the same regions (speed at equal work).
* **deepalign polar trunk** (`model: polar_trunk`, `core/polar.py`): one rotation-invariant net
  on polar-resampled images, 42 heads, trained on all regions at once; after every epoch the
  balanced validation accuracy of each head on the same split. Its whole-job time is the training
  time (incl. validation) until the mean accuracy of the heads of the Keras regions first reaches
  the Keras recipe's mean best accuracy on those regions. Also reported: the first epoch at which
  every Keras region's head reaches that region's own Keras best, and the top-2 accuracy (true
  region among the two most probable) on the validation split — what `predict --top-k 2` hands
  to `align`. (The shared-trunk contender of earlier runs was removed with its model.)

Writes a markdown summary to stdout and benchmarks/results/whole_job.json (`_harness.write_result`).
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # before JAX starts

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import mrcfile  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras_reference  # noqa: E402
from _harness import write_result  # noqa: E402

from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import augment, batches, cnn, geometry, inference, preprocess, regions, simulate, symmetry, training  # noqa: E402
from deepalign_cli.core.split import split_train_val  # noqa: E402

MAP = Path(os.environ.get("DEEPALIGN_DATA", "/work/shared/data")) / "ribosome70S_65.mrc"
PIXEL_ANG = 5.0
N_REGIONS_SPACING = 30.0


def make_data(n, box, snr, seed):
    vol = mrcfile.read(MAP).astype(np.float32)
    sim = simulate.simulate_particles(jax.random.key(seed), vol, n, PIXEL_ANG, snr=snr, box=box, max_shift_px=2.0)
    images = np.asarray(preprocess.normalize_background(sim["images"]), np.float32)
    ops = symmetry.symmetry_operators("C1")
    centres = regions.region_centres(N_REGIONS_SPACING, ops)
    dirs = geometry.projection_direction(sim["eulers_deg"][:, 0], sim["eulers_deg"][:, 1])
    labels, _ = regions.assign_regions(dirs, centres, ops)
    return images, labels.astype(np.int64), len(centres)


def keras_recipe(images, labels, train_idx, val_idx, region, cfg, seed):
    """(best val acc, per-epoch val accs, seconds in train_on_batch + validation predict)."""
    box = images.shape[1]
    model = keras_reference.build(box, cnn.kernel_sizes(box, cfg.kernel_fractions), lr=cfg.learning_rate)
    y_tr, y_val = labels[train_idx], (labels[val_idx] == region).astype(np.float32)
    pos, neg = np.flatnonzero(y_tr == region), np.flatnonzero(y_tr != region)
    train_images = jnp.asarray(images[train_idx])
    val_x = images[val_idx][..., None]
    sample = jax.jit(lambda k: _batch(k, train_images, jnp.asarray(pos), pos.size, jnp.asarray(neg), neg.size, cfg, box))
    n_steps = math.ceil(cfg.images_per_region / cfg.batch_size)
    key = jax.random.key(seed)
    model.train_on_batch(*[np.asarray(a) for a in sample(key)])  # warm-up (graph build), not timed
    seconds, accs = 0.0, []
    for epoch in range(cfg.epochs):
        for s in range(n_steps):
            x, y = (np.asarray(a) for a in sample(jax.random.fold_in(key, epoch * n_steps + s + 1)))
            t = time.perf_counter()
            model.train_on_batch(x, y)
            seconds += time.perf_counter() - t
        t = time.perf_counter()
        p = model.predict(val_x, batch_size=512, verbose=0)[:, 0]
        seconds += time.perf_counter() - t
        correct = (p > 0.5) == (y_val > 0.5)
        accs.append(float(0.5 * correct[y_val > 0.5].mean() + 0.5 * correct[y_val < 0.5].mean()))
    return max(accs), accs, seconds


def _batch(key, train_images, pos, n_pos, neg, n_neg, cfg, box):
    k_b, k_a = jax.random.split(key)
    idx, y = batches.balanced_batch(k_b, pos, n_pos, neg, n_neg, cfg.batch_size)
    x = augment.augment(k_a, train_images[idx], cfg.max_shift_frac * box)
    return x[..., None], y


def deepalign_run(images, labels, region_ids, cfg, seed):
    """train_regions with a progress hook: {region: [(epoch, val_acc, seconds), …]} (a one-net
    model's epochs are logged under each of its regions, with the mean validation accuracy)."""
    log: dict[int, list] = {}

    def progress(ev):
        if ev.get("event") == "epoch":
            for r in ev["regions"]:
                log.setdefault(r, []).append((ev["epoch"], ev["val_acc"], ev["seconds"]))

    t = time.perf_counter()
    out = training.train_regions(images, labels, region_ids, cfg, jax.random.key(seed), progress=progress)
    return out, log, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--particles", type=int, default=8400, help="labelled particles (paper's ribosome: ~8,500)")
    ap.add_argument("--keras-regions", type=int, default=3)
    ap.add_argument("--trunk-images", type=int, default=2000, help="polar trunk: images per region per epoch")
    ap.add_argument("--polar-epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/whole_job.json)")
    a = ap.parse_args()
    if not keras_reference.available():
        sys.exit("whole_job.py needs TensorFlow: pip install -e '.[bench]'")
    images, labels, n_regions = make_data(a.particles, a.box, a.snr, a.seed)
    recipe = TrainConfig(epochs=10, images_per_region=10000, early_stopping_patience=0, seed=a.seed)
    key = jax.random.key(a.seed)
    train_idx, val_idx = split_train_val(key, labels, recipe.validation_fraction)
    counts = np.bincount(labels, minlength=n_regions)
    rng = np.random.default_rng(a.seed)
    typical = np.flatnonzero(np.abs(counts - np.median(counts)) <= 0.25 * np.median(counts))
    chosen = sorted(int(r) for r in rng.choice(typical, a.keras_regions, replace=False))
    res = {"box_px": a.box, "snr": a.snr, "particles": a.particles,
           "n_regions": n_regions, "keras_regions": chosen, "region_counts": counts.tolist()}

    # 1. the paper's recipe in Keras, region after region
    keras = [keras_recipe(images, labels, train_idx, val_idx, r, recipe, a.seed + r) for r in chosen]
    res["keras"] = {"best_val_acc": [k[0] for k in keras], "val_acc": [k[1] for k in keras], "seconds": [k[2] for k in keras]}
    target = float(np.mean(res["keras"]["best_val_acc"]))
    keras_region_s = float(np.mean(res["keras"]["seconds"]))
    res["keras"]["job_seconds_42"] = keras_region_s * n_regions
    print(f"keras: best val acc {res['keras']['best_val_acc']} mean {target:.3f}; {keras_region_s:.1f} s/region", flush=True)

    # 2. deepalign per-region nets, same recipe, same regions
    _, log, _ = deepalign_run(images, labels, chosen, recipe, a.seed)
    pr_s = [sum(e[2] for e in log[r]) for r in chosen]
    pr_acc = [max(e[1] for e in log[r]) for r in chosen]
    res["deepalign_per_region"] = {"best_val_acc": pr_acc, "seconds": pr_s, "job_seconds_42": float(np.mean(pr_s)) * n_regions,
                                   "val_acc": [[e[1] for e in log[r]] for r in chosen]}
    print(f"deepalign per-region: best val acc {pr_acc}; {np.mean(pr_s):.1f} s/region", flush=True)
    # the same run, stopped at the first epoch whose validation accuracy reaches that region's
    # Keras best (what early stopping on a target gives; None where it never does)
    to_target = []
    for r, k_best in zip(chosen, res["keras"]["best_val_acc"]):
        hit = next((i for i, e in enumerate(log[r]) if e[1] is not None and e[1] >= k_best), None)
        to_target.append(None if hit is None else (hit + 1, float(sum(e[2] for e in log[r][: hit + 1]))))
    reached_all = all(t is not None for t in to_target)
    job_to_target = float(np.mean([t[1] for t in to_target])) * n_regions if reached_all else None
    res["deepalign_per_region_to_keras_acc"] = {"epoch_and_seconds": to_target, "job_seconds_42": job_to_target,
                                                "speedup_vs_keras": None if job_to_target is None else res["keras"]["job_seconds_42"] / job_to_target}

    # 3. deepalign polar trunk on all regions, until the heads of the chosen regions reach the target
    res["target_val_acc"] = target
    val_x, val_y = images[val_idx], labels[val_idx]
    one_net_cfg = recipe.model_copy(update={"model": "polar_trunk", "epochs": a.polar_epochs, "images_per_region": a.trunk_images})
    out, log, total = deepalign_run(images, labels, range(n_regions), one_net_cfg, a.seed)
    epoch_s = [e[2] for e in log[chosen[0]]]  # the trunk's epochs, logged under every region
    head_acc = {r: [h["val_acc"] for h in out[r]["history"]] for r in range(n_regions)}
    chosen_mean = [float(np.mean([head_acc[r][e] for r in chosen])) for e in range(len(epoch_s))]
    all_mean = [float(np.mean([head_acc[r][e] for r in range(n_regions) if head_acc[r][e] is not None])) for e in range(len(epoch_s))]
    reach = next((e for e, v in enumerate(chosen_mean) if v >= target), None)
    each = next((e for e in range(len(epoch_s)) if all(head_acc[r][e] >= k for r, k in zip(chosen, res["keras"]["best_val_acc"]))), None)
    job_s = None if reach is None else float(np.sum(epoch_s[: reach + 1]))
    probs = inference.predict_probs(out, val_x, 512)  # the best epoch's net (by validation loss)
    top2 = float(np.mean(np.any(np.argsort(-probs, axis=1)[:, :2] == val_y[:, None], axis=1)))
    res["deepalign_polar"] = {
        "epoch_seconds": epoch_s, "chosen_mean_val_acc": chosen_mean, "all_mean_val_acc": all_mean,
        "chosen_val_acc": [head_acc[r] for r in chosen], "epoch_reaching_target": reach, "job_seconds_42": job_s,
        "epoch_each_region_reaching_its_keras_best": each,
        "job_seconds_42_each_region": None if each is None else float(np.sum(epoch_s[: each + 1])),
        "best_epoch": out[chosen[0]]["best_epoch"], "val_top2_accuracy_best_epoch": top2,
        "images_per_region_per_epoch": a.trunk_images}
    res["speedup_polar_vs_keras"] = None if job_s is None else res["keras"]["job_seconds_42"] / job_s
    print(f"deepalign polar trunk: chosen mean val acc per epoch {[round(v, 3) for v in chosen_mean]}, "
          f"epoch s {[round(v, 1) for v in epoch_s]}, top-2 {top2:.3f}", flush=True)
    res["speedup_per_region_vs_keras"] = res["keras"]["job_seconds_42"] / res["deepalign_per_region"]["job_seconds_42"]

    print(f"\nwhole job, 42 regions, {a.box} px, SNR {a.snr}, {a.particles} labelled particles ({os.cpu_count()} CPUs)\n")
    print("| contender | mean best val acc (regions " + ", ".join(map(str, chosen)) + ") | time for 42 regions | vs Keras |")
    print("|---|---|---|---|")
    print(f"| Keras recipe (10 × 10,000 per region) | {target:.3f} | {res['keras']['job_seconds_42'] / 60:.1f} min (42 × {keras_region_s:.0f} s) | 1× |")
    d = res["deepalign_per_region"]
    print(f"| deepalign per-region, same recipe | {np.mean(d['best_val_acc']):.3f} | {d['job_seconds_42'] / 60:.1f} min | "
          f"{res['speedup_per_region_vs_keras']:.2f}× |")
    t = res["deepalign_per_region_to_keras_acc"]
    epochs = ", ".join("never" if e is None else str(e[0]) for e in t["epoch_and_seconds"])
    job = "—" if job_to_target is None else f"{job_to_target / 60:.1f} min"
    ratio = "—" if t["speedup_vs_keras"] is None else f"**{t['speedup_vs_keras']:.2f}×**"
    print(f"| deepalign per-region, stopped at each region's Keras accuracy (epoch {epochs}) | "
          f"≥ Keras per region{'' if reached_all else ' (not all)'} | {job} | {ratio} |")
    s = res["deepalign_polar"]
    reach, cm, job_s = s["epoch_reaching_target"], s["chosen_mean_val_acc"], s["job_seconds_42"]
    reached = "not reached" if reach is None else f"{cm[reach]:.3f} at epoch {reach + 1}"
    speed = res["speedup_polar_vs_keras"]
    print(f"| deepalign polar trunk, to the Keras accuracy | {reached} (best {max(cm):.3f}; all heads {max(s['all_mean_val_acc']):.3f}) | "
          f"{'—' if job_s is None else f'{job_s / 60:.1f} min'} | {'—' if speed is None else f'**{speed:.1f}×**'} |")
    each = s["epoch_each_region_reaching_its_keras_best"]
    if each is not None:
        print(f"| deepalign polar trunk, every Keras region's head at its own Keras best | epoch {each + 1} | "
              f"{s['job_seconds_42_each_region'] / 60:.1f} min | **{res['keras']['job_seconds_42'] / s['job_seconds_42_each_region']:.1f}×** |")
    print(f"\ntop-2 accuracy on the validation split (best epoch): polar {res['deepalign_polar']['val_top2_accuracy_best_epoch']:.3f}")
    print(f"→ {write_result('whole_job', res, a.out)}")


if __name__ == "__main__":
    main()
