"""Training and prediction speed of the region classifiers, side by side with the paper's network
in Keras on TensorFlow-CPU (when `tensorflow` is importable: `pip install -e '.[bench]'`).

    python benchmarks/train_predict.py [--quick] [--sizes 64 120] [--conv-sweep] [--out PATH]

Random normalised images, batch 128, 42 regions. Training: image-steps/s of one region's epoch as
`training.train_regions` runs it (balanced sampling + augmentation + Adam step; the epoch's wall
time between its progress reports, after a first epoch that compiles; no validation split) against
Keras `train_on_batch`, run back to back (and repeated `--repeat` times: this machine's speed
drifts, only same-run ratios count). Prediction: particle·region/s of `inference.predict` over 42
nets (prepared once, as `deepalign predict` does; compilation excluded) against Keras `predict` of
one net (the paper predicts region after region, so its particle·region/s equals one net's
particles/s). FLOP/s: XLA's cost analysis of one training step (built here from the same public
pieces: `batches.balanced_batch`, `augment.augment`, the model's train-mode apply, Adam) and of
the forward pass ÷ the measured time, beside a float32 matmul ceiling measured in the same run.
The whole-job figures are extrapolated from the measured rates to the paper's recipe (42 regions ×
10 epochs × 10,000 images), not run. On CPU the vmapped (42 nets stacked) prediction is skipped
(measured 0.2× the loop at 64 px; it is the GPU path).
Results: stdout (markdown) and benchmarks/results/train_predict.json (`_harness.write_result`).
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # before JAX starts: this module is also imported by gpu.py and experiments/

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras_reference  # noqa: E402
from _harness import matmul_flops, write_result, xla_cost  # noqa: E402

from deepalign_cli import host_malloc  # noqa: E402
from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import augment, batches, cnn, inference, models, training  # noqa: E402

N_REGIONS = 42
PAPER_EPOCHS, PAPER_IMAGES = 10, 10000
VMAP_PREDICT_BATCH = 32
CONV_SWEEP = ("direct", "fft", "s2d")  # `TrainConfig.conv_impl` values timed by --conv-sweep (besides "auto")


def _images(n, box, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    return x, np.arange(n) % N_REGIONS


def _model(box, cfg, impls=None):
    model = cnn.build(cnn.architecture(cfg, box, 1), cfg.conv_impl)
    return model.clone(conv_impls=tuple(impls)) if impls else model


def region_train_step(model, tx, batch_size: int, max_shift_px: float):
    """One optimiser step of one per-region net, made as `train_regions` makes it, from public
    pieces: a balanced batch (`batches.balanced_batch`), on-device rotation + shift
    (`augment.augment`), binary cross-entropy on the train-mode logits, the `tx` update.
    step(params, batch_stats, opt_state, images (n, N, N), pos_idx, n_pos, neg_idx, n_neg, key)
    -> (params, batch_stats, opt_state, loss)."""

    def step(params, batch_stats, opt_state, images, pos_idx, n_pos, neg_idx, n_neg, key):
        k_batch, k_aug, k_drop = jax.random.split(key, 3)
        idx, y = batches.balanced_batch(k_batch, pos_idx, n_pos, neg_idx, n_neg, batch_size)
        x = augment.augment(k_aug, images[idx], max_shift_px)

        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x[..., None], train=True,
                                      rngs={"dropout": k_drop}, mutable=["batch_stats"])
            return optax.sigmoid_binary_cross_entropy(logits[:, 0], y).mean(), upd["batch_stats"]

        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_bs, opt_state, loss

    return step


def train_step_cost(box, cfg, impls=None) -> dict:
    """Cost of one per-region training step (batch_size images) from XLA's cost analysis."""
    model = _model(box, cfg, impls)
    v = training.init_region_params(jax.random.key(0), cfg, box, 1)[0]
    tx = optax.adam(cfg.learning_rate)
    step = region_train_step(model, tx, cfg.batch_size, float(cfg.max_shift_frac * box))
    imgs = jnp.zeros((512, box, box), jnp.float32)
    idx = jnp.arange(512, dtype=jnp.int32)
    return xla_cost(step, v["params"], v["batch_stats"], tx.init(v["params"]), imgs, idx, jnp.int32(256), idx, jnp.int32(256),
                    jax.random.key(0))


def train_step_flops(box, cfg, impls=None) -> float:
    """FLOP of one per-region training step (batch_size images) from XLA's cost analysis."""
    return train_step_cost(box, cfg, impls)["flops"]


def forward_cost(box, cfg, impls=None, batch=128) -> dict:
    """Cost of one net's forward pass (eval mode, what predict runs) on `batch` images."""
    model = _model(box, cfg, impls)
    v = training.init_region_params(jax.random.key(0), cfg, box, 1)[0]
    x = jnp.zeros((batch, box, box, 1), jnp.float32)
    return xla_cost(lambda v, x: model.apply(v, x, train=False), {"params": v["params"], "batch_stats": v["batch_stats"]}, x)


def predict_flops_per_image(box, cfg, impl="auto") -> float:
    """FLOP of one net's forward pass per image (eval mode, what predict runs)."""
    return forward_cost(box, cfg.model_copy(update={"conv_impl": impl}))["flops"] / 128


def train_timing(box, n_steps, cfg, n_regions=1, model="per_region", region_parallel="loop", conv_impl=None,
                 timed_epochs=1, n_images=512) -> dict:
    """`training.train_regions` on random images (labels: image i is region i mod 42), timed by its
    progress reports: an epoch lasts from the previous epoch's last report to its own last one
    (over all regions), so the loop and the vmapped formulation are timed alike; the first epoch
    compiles, then `timed_epochs` more. Per-region nets: regions 0 … n_regions−1, each n_steps
    steps per epoch; a one-net model (polar trunk): all 42 labels, ≈ n_steps steps. No validation
    split and no early stopping, so an epoch is training steps only.
    Returns {"first_epoch_s", "epoch_s", "image_steps_per_s" (the fastest timed epoch), "finite"}."""
    images, labels = _images(n_images, box)
    one_net = models.get(model).one_net
    per_region_images = math.ceil(2 * n_steps * cfg.batch_size / N_REGIONS) if one_net else n_steps * cfg.batch_size
    update = {"model": model, "epochs": 1 + timed_epochs, "images_per_region": per_region_images, "validation_fraction": 0.0,
              "early_stopping_patience": 0, "min_positives": 1, "region_parallel": region_parallel}
    cfg = cfg.model_copy(update={**update, **({"conv_impl": conv_impl} if conv_impl else {})})
    ends, done, losses = {}, {}, []

    def progress(ev):
        if ev["event"] == "epoch":
            ends[ev["epoch"]] = time.perf_counter()
            done[ev["epoch"]] = done.get(ev["epoch"], 0) + ev["images"]
            losses.append(ev["train_loss"])

    t0 = time.perf_counter()
    training.train_regions(images, labels, range(N_REGIONS if one_net else n_regions), cfg, jax.random.key(0), progress=progress)
    starts = [t0] + [ends[e] for e in range(cfg.epochs - 1)]
    seconds = [ends[e] - starts[e] for e in range(cfg.epochs)]
    return {"first_epoch_s": seconds[0], "epoch_s": seconds[1:], "finite": bool(np.isfinite(losses).all()),
            "image_steps_per_s": max(done[e] / seconds[e] for e in range(1, cfg.epochs))}


def jax_train_rate(box, n_steps, cfg, conv_impl=None, model="per_region"):
    """image-steps/s of one region's epoch (a one-net model: its epoch over all 42 labels)."""
    return train_timing(box, n_steps, cfg, model=model, conv_impl=conv_impl)["image_steps_per_s"]


def _predict_rate(nets: dict, images, batch_size, region_parallel="auto"):
    """particle·region/s of `inference.predict` with the nets prepared once (as `deepalign
    predict` does), after a call on one batch that compiles."""
    predictor = inference.prepare(nets, batch_size, region_parallel)
    inference.predict(predictor, images[:batch_size])
    t = time.perf_counter()
    inference.predict(predictor, images)
    return images.shape[0] * len(predictor.regions) / (time.perf_counter() - t)


def jax_predict_rate(box, n, cfg, region_parallel, batch_size=512, n_regions=N_REGIONS):
    """particle·region/s of n_regions per-region nets (`inference` formulation `region_parallel`)."""
    images, _ = _images(n, box, 1)
    arch = cnn.architecture(cfg, box, 1)
    variables = training.init_region_params(jax.random.key(0), cfg, box, n_regions)
    return _predict_rate({r: {**v, "arch": arch, "head": 0} for r, v in enumerate(variables)}, images, batch_size, region_parallel)


def jax_one_net_predict_rate(box, n, cfg, model="polar_trunk", batch_size=512):
    """particle·region/s of a one-net model (the polar trunk) with N_REGIONS heads."""
    images, _ = _images(n, box, 1)
    cfg = cfg.model_copy(update={"model": model})
    arch = models.architecture(cfg, box, N_REGIONS)
    v = training.init_region_params(jax.random.key(0), cfg, box, N_REGIONS)[0]
    return _predict_rate({r: {**v, "arch": arch, "head": r} for r in range(N_REGIONS)}, images, batch_size)


def _fmt(x, spec=".0f"):
    return "n/a" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and particles")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 120])
    ap.add_argument("--repeat", type=int, default=2, help="back-to-back JAX/Keras pairs per size")
    ap.add_argument("--conv-sweep", action="store_true", help=f"also time training with conv_impl {', '.join(CONV_SWEEP)}")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/train_predict.json)")
    a = ap.parse_args()
    one_arena = host_malloc.share_one_arena(min(a.sizes))  # as `deepalign train`/`predict` do at these boxes
    cfg = TrainConfig()
    n_steps, n_pred = (2, 512) if a.quick else (4, 2048)
    have_tf = keras_reference.available()
    on_cpu = jax.default_backend() == "cpu"
    rows, out = [], {"quick": a.quick, "sizes": a.sizes, "tensorflow": have_tf, "one_malloc_arena": one_arena, "boxes": {}}
    out["matmul_ceiling_gflops"] = matmul_flops() / 1e9
    for box in a.sizes:
        kernels = cnn.kernel_sizes(box, cfg.kernel_fractions)
        steps = max(2, n_steps // 2) if box >= 100 else n_steps
        n_p = n_pred // 4 if box >= 100 else n_pred
        r = {"kernels": kernels, "conv_impls": cnn.conv_impls_for(kernels, cfg.conv_impl), "pairs": []}
        r["train_step_gflop"] = train_step_flops(box, cfg) / 1e9
        r["predict_mflop_per_image"] = predict_flops_per_image(box, cfg) / 1e6
        km = keras_reference.build(box, kernels, lr=cfg.learning_rate) if have_tf else None
        for _ in range(a.repeat):
            pair = {"jax_train": jax_train_rate(box, steps, cfg)}
            if have_tf:
                imgs, labels = _images(512, box)
                pair["keras_train"] = keras_reference.time_train_steps(km, imgs, (labels == 0), steps)
            pair["jax_predict_loop"] = jax_predict_rate(box, n_p, cfg, "loop")
            if have_tf:
                pair["keras_predict"] = keras_reference.time_predict(km, _images(n_p, box, 1)[0])
            r["pairs"].append(pair)
            print(box, "px pair:", {k: round(v, 1) for k, v in pair.items()}, flush=True, file=sys.stderr)
        # the reported pair: the one with the median JAX/Keras training ratio (all pairs in the JSON)
        key = (lambda p: p["jax_train"] / p["keras_train"]) if have_tf else (lambda p: p["jax_train"])
        best = sorted(r["pairs"], key=key)[len(r["pairs"]) // 2]
        r.update(best)
        if not on_cpu:  # the stacked-nets path is the accelerator's
            r["jax_predict_vmap"] = jax_predict_rate(box, n_p, cfg, "vmap", VMAP_PREDICT_BATCH)
        r["jax_train_gflops"] = r["jax_train"] / cfg.batch_size * r["train_step_gflop"]
        r["jax_predict_gflops"] = r["jax_predict_loop"] * r["predict_mflop_per_image"] / 1e3
        if have_tf:  # same network, same FLOP count per image
            r["keras_train_gflops"] = r["keras_train"] / cfg.batch_size * r["train_step_gflop"]
        job_steps = N_REGIONS * PAPER_EPOCHS * math.ceil(PAPER_IMAGES / cfg.batch_size) * cfg.batch_size
        r["job_hours_jax_per_region"] = job_steps / r["jax_train"] / 3600
        if have_tf:
            r["job_hours_keras"] = job_steps / r["keras_train"] / 3600
        if a.conv_sweep:
            r["sweep"] = {impl: jax_train_rate(box, steps, cfg, conv_impl=impl) for impl in CONV_SWEEP}
            print(box, "px conv sweep (img-steps/s):", {k: round(v) for k, v in r["sweep"].items()}, flush=True)
        out["boxes"][box] = r
        kt, jt = r.get("keras_train"), r["jax_train"]
        kp, jp = r.get("keras_predict"), r["jax_predict_loop"]
        rows.append(" | ".join([
            f"| {box}", f"{kernels} {'/'.join(r['conv_impls'])}", _fmt(jt), _fmt(kt), "**" + _fmt(kt and jt / kt, ".2f") + "×**",
            _fmt(jp), _fmt(kp), "**" + _fmt(kp and jp / kp, ".2f") + "×**",
            f"{r['jax_train_gflops']:.0f} / {_fmt(r.get('keras_train_gflops'))}", f"{r['jax_predict_gflops']:.0f}",
            _fmt(r["job_hours_jax_per_region"], ".1f"), _fmt(r.get("job_hours_keras"), ".1f") + " |"]))
    print(f"\nfloat32 matmul ceiling: {out['matmul_ceiling_gflops']:.0f} GFLOP/s")
    print("| box px | kernels, conv | JAX train img-steps/s (1 region) | Keras img-steps/s | JAX/Keras train |"
          " JAX predict particle·region/s | Keras predict | JAX/Keras predict |"
          " train GFLOP/s JAX / Keras | predict GFLOP/s JAX | job h JAX (extrap.) | job h Keras (extrap.) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"→ {write_result('train_predict', out, a.out)}")


if __name__ == "__main__":
    main()
