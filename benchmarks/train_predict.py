"""Training and prediction speed of the region classifiers, side by side with the paper's network
in Keras on TensorFlow-CPU (when `tensorflow` is importable: `pip install -e '.[bench]'`).

    python benchmarks/train_predict.py [--quick] [--conv-sweep]

Random normalised images, batch 128, 42 regions. Training: image-steps/s of one region's jitted
epoch (balanced sampling + augmentation + Adam step, what `train_regions` runs) against Keras
`train_on_batch`, run back to back. Prediction: particle·region/s of `predict_probs` over 42 nets
against Keras `predict` of one net (the paper predicts region after region, so its
particle·region/s equals one net's particles/s). The whole-job figures are extrapolated from the
measured rates to the paper's recipe (42 regions × 10 epochs × 10,000 images), not run.
Results: stdout (markdown) and benchmarks/results/train_predict.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras_reference  # noqa: E402

from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import cnn, training  # noqa: E402

N_REGIONS = 42
PAPER_EPOCHS, PAPER_IMAGES = 10, 10000
VMAP_PREDICT_BATCH = 32


def _images(n, box, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    return x, np.arange(n) % N_REGIONS


def jax_train_rate(box, n_steps, cfg, impls=None, model_kind="per_region"):
    cfg = cfg.model_copy(update={"model": model_kind})
    images, labels = _images(512, box)
    imgs = jnp.asarray(images)
    n_heads = N_REGIONS if model_kind == "shared_trunk" else 1
    model = cnn.build_model(cnn.architecture(cfg, box, n_heads), cfg.conv_impl)
    if impls:
        model = model.clone(conv_impls=tuple(impls))
    v = training.init_region_params(jax.random.key(0), cfg, box, n_heads)[0]
    import optax

    opt = optax.adam(cfg.learning_rate).init(v["params"])
    if model_kind == "shared_trunk":
        fn = training._shared_epoch_fn(model, cfg.learning_rate, n_steps, cfg.batch_size, cfg.max_shift_frac * box)
        members = jnp.asarray(np.stack([np.flatnonzero(labels == r)[:12] for r in range(N_REGIONS)]).astype(np.int32))
        args = (members, jnp.full(N_REGIONS, 12, jnp.int32), jnp.asarray(labels.astype(np.int32)), jnp.arange(N_REGIONS, dtype=jnp.int32))
    else:
        fn = training._region_epoch_fn(model, cfg.learning_rate, n_steps, cfg.batch_size, cfg.max_shift_frac * box)[0]
        pos, neg = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)
        args = (jnp.asarray(training._padded(pos, 512)), jnp.int32(pos.size), jnp.asarray(training._padded(neg, 512)), jnp.int32(neg.size))
    jax.block_until_ready(fn(v["params"], v["batch_stats"], opt, imgs, *args, jax.random.key(1)))  # compile + warm
    t = time.perf_counter()
    jax.block_until_ready(fn(v["params"], v["batch_stats"], opt, imgs, *args, jax.random.key(2)))
    return n_steps * cfg.batch_size / (time.perf_counter() - t)


def jax_predict_rate(box, n, cfg, region_parallel, batch_size=512):
    images, _ = _images(n, box, 1)
    arch = cnn.architecture(cfg, box, 1)
    models = {r: {**v, "arch": arch, "head": 0} for r, v in enumerate(training.init_region_params(jax.random.key(0), cfg, box, N_REGIONS))}
    training.predict_probs(models, images[:batch_size], batch_size, region_parallel)  # compile
    t = time.perf_counter()
    training.predict_probs(models, images, batch_size, region_parallel)
    return n * N_REGIONS / (time.perf_counter() - t)


def _fmt(x, spec=".0f"):
    return "n/a" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="< 2 min: fewer steps and particles")
    ap.add_argument("--conv-sweep", action="store_true", help="also time every direct/FFT combination per layer")
    a = ap.parse_args()
    cfg = TrainConfig()
    n_steps, n_pred = (2, 1024) if a.quick else (6, 4096)
    have_tf = keras_reference.available()
    rows, out = [], {"machine": platform.processor() or platform.machine(), "cpus": jax.local_device_count(),
                     "backend": jax.default_backend(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "quick": a.quick, "tensorflow": have_tf, "boxes": {}}
    for box in (64, 120):
        kernels = cnn.kernel_sizes(box, cfg.kernel_fractions)
        steps = max(1, n_steps // 2) if box == 120 else n_steps
        r = {"kernels": kernels, "conv_impls": cnn.conv_impls_for(kernels, "auto")}
        r["jax_train"] = jax_train_rate(box, steps, cfg)
        r["jax_shared_train"] = jax_train_rate(box, steps, cfg, model_kind="shared_trunk")
        if have_tf:
            km = keras_reference.build(box, kernels, lr=cfg.learning_rate)
            imgs, labels = _images(512, box)
            r["keras_train"] = keras_reference.time_train_steps(km, imgs, (labels == 0), steps)
            r["keras_predict"] = keras_reference.time_predict(km, _images(n_pred // 4, box, 1)[0])
        r["jax_predict_loop"] = jax_predict_rate(box, n_pred // (4 if box == 120 else 1), cfg, "loop")
        # vmap stacks 42 nets' activations: batch 32 keeps it < 3 GB at 120 px (512 was killed for memory)
        r["jax_predict_vmap"] = jax_predict_rate(box, n_pred // (4 if box == 120 else 1), cfg, "vmap", VMAP_PREDICT_BATCH)
        job_steps = N_REGIONS * PAPER_EPOCHS * math.ceil(PAPER_IMAGES / cfg.batch_size) * cfg.batch_size
        shared_steps = PAPER_EPOCHS * math.ceil(PAPER_IMAGES * N_REGIONS / (2 * cfg.batch_size)) * cfg.batch_size
        r["job_hours_jax_per_region"] = job_steps / r["jax_train"] / 3600
        r["job_hours_jax_shared"] = shared_steps / r["jax_shared_train"] / 3600
        if have_tf:
            r["job_hours_keras"] = job_steps / r["keras_train"] / 3600
        if a.conv_sweep:
            combos = [("direct",) * 3, ("fft", "direct", "direct"), ("fft", "fft", "direct"), ("fft",) * 3]
            r["sweep"] = {"/".join(c): jax_train_rate(box, steps, cfg, c) for c in combos}
            print(box, "px conv sweep (img-steps/s):", {k: round(v) for k, v in r["sweep"].items()}, flush=True)
        out["boxes"][box] = r
        print(box, "px:", {k: v for k, v in r.items() if k != "sweep"}, flush=True, file=sys.stderr)
        kt, jt = r.get("keras_train"), r["jax_train"]
        rows.append(" | ".join([
            f"| {box}", f"{kernels} {'/'.join(r['conv_impls'])}", _fmt(jt), _fmt(r["jax_shared_train"]), _fmt(kt),
            _fmt(kt and jt / kt, ".2f"), f"{_fmt(r['jax_predict_loop'])} / {_fmt(r['jax_predict_vmap'])}",
            _fmt(r.get("keras_predict")), f"{_fmt(r['job_hours_jax_per_region'], '.1f')} / {_fmt(r['job_hours_jax_shared'], '.1f')}",
            _fmt(r.get("job_hours_keras"), ".1f") + " |"]))
    print("| box px | kernels, conv | jax train img-steps/s (1 region) | jax shared-trunk img-steps/s | keras img-steps/s | jax/keras |"
          " jax predict particle·region/s loop / vmap | keras predict particle·region/s | job h jax per-region / shared (extrap.) | job h keras (extrap.) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    dest = Path(__file__).resolve().parent / "results" / "train_predict.json"
    dest.parent.mkdir(exist_ok=True)
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, default=float))
    tmp.replace(dest)


if __name__ == "__main__":
    main()
