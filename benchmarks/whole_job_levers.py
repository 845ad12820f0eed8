"""Levers tried against the whole-job target (`whole_job.py`), on the same data, split and regions.

    .venv/bin/python benchmarks/whole_job_levers.py schedule cosine,2,10000,2e-3 const,3,10000,2e-3
    .venv/bin/python benchmarks/whole_job_levers.py shared filters=32-64-128,dense=512,epochs=8,ipr=2000
    .venv/bin/python benchmarks/whole_job_levers.py ema 0.99 0.998

Data as in `whole_job.py` (8,400 labelled particles simulated from the shipped map, 32 px,
SNR 0.5, 42 regions, the stratified 80/20 split of `train_regions`, key 0) and its three typical
regions 20, 25, 33. Each experiment prints one JSON line per run with the balanced validation
accuracy per epoch:
* `schedule SCHED,EPOCHS,IMAGES,LR …`: per-region nets with Adam at a learning-rate schedule over
  the whole run (const, cosine: `optax.cosine_decay_schedule`, warmcos: 10 % linear warm-up then
  cosine).
* `shared KEY=VALUE,… …`: the shared trunk (42 heads) with other widths (filters=A-B-C, dense,
  epochs, ipr = images per region per epoch, lr, loss, sched const|cosine).
* `ema DECAY …`: per-region nets, constant rate, with exponential moving averages of the weights
  (updated after every Adam step) evaluated beside the raw weights after every epoch (the net's
  running batch statistics for all).
The schedule and EMA are put in by swapping `training.optax.adam` for a wrapper (the product code
has neither); nothing here is a `deepalign` option. Results in `RESULTS.md` ("Whole training job").
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import whole_job  # noqa: E402

from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import cnn, training  # noqa: E402

REGIONS = [20, 25, 33]
RECIPE = TrainConfig(epochs=10, images_per_region=10000, early_stopping_patience=0, seed=0)
_ADAM = optax.adam


class _Optax:
    """`optax` with another `adam`, installed as `training.optax` for one run."""

    def __init__(self, adam):
        self.adam = adam

    def __getattr__(self, name):
        return getattr(optax, name)


def _with_adam(adam):
    training.optax = _Optax(adam)
    training._region_epoch_fn.cache_clear()
    training._shared_epoch_fn.cache_clear()


def _schedule(name: str, lr: float, total: int):
    if name == "const":
        return lr
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, total)
    if name == "warmcos":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, total // 10), total)
    raise SystemExit(f"unknown schedule {name!r}: const, cosine or warmcos")


def _epochs_log():
    log: dict[int, list] = {}

    def progress(ev):
        if ev.get("event") == "epoch":
            log.setdefault(ev["region"], []).append(ev)

    return log, progress


def schedule(data, spec: str) -> dict:
    images, labels, _ = data
    name, epochs, ipr, lr = spec.split(",")
    cfg = RECIPE.model_copy(update={"epochs": int(epochs), "images_per_region": int(ipr), "learning_rate": float(lr)})
    total = cfg.epochs * math.ceil(cfg.images_per_region / cfg.batch_size)
    _with_adam(lambda lr: _ADAM(_schedule(name, lr, total)))
    log, progress = _epochs_log()
    t = time.perf_counter()
    training.train_regions(images, labels, REGIONS, cfg, jax.random.key(cfg.seed), progress=progress)
    return {"spec": spec, "seconds_per_region": (time.perf_counter() - t) / len(REGIONS),
            "val_acc": {r: [round(e["val_acc"], 3) for e in log[r]] for r in REGIONS},
            "train_acc": {r: [round(e["train_acc"], 3) for e in log[r]] for r in REGIONS}}


def shared(data, spec: str) -> dict:
    images, labels, n_regions = data
    f = dict(kv.split("=") for kv in spec.split(",")) if spec else {}
    cfg = RECIPE.model_copy(update={
        "model": "shared_trunk", "epochs": int(f.get("epochs", 16)), "images_per_region": int(f.get("ipr", 2000)),
        "conv_filters": tuple(int(x) for x in f.get("filters", "16-32-64").split("-")), "dense_units": int(f.get("dense", 256)),
        "learning_rate": float(f.get("lr", 2e-3)), "shared_loss": f.get("loss", "one_vs_rest")})
    total = cfg.epochs * math.ceil(cfg.images_per_region * n_regions / (2 * cfg.batch_size))
    _with_adam(lambda lr: _ADAM(_schedule(f.get("sched", "const"), lr, total)))
    log, progress = _epochs_log()
    t = time.perf_counter()
    out = training.train_regions(images, labels, range(n_regions), cfg, jax.random.key(cfg.seed), progress=progress)
    n_ep = len(log[training.SHARED_REGION])
    acc = lambda rs, e: float(np.mean([out[r]["history"][e]["val_acc"] for r in rs if out[r]["history"][e]["val_acc"] is not None]))
    return {"spec": spec, "seconds": time.perf_counter() - t, "epoch_seconds": [e["seconds"] for e in log[training.SHARED_REGION]],
            "chosen_mean_val_acc": [round(acc(REGIONS, e), 3) for e in range(n_ep)],
            "all_mean_val_acc": [round(acc(range(n_regions), e), 3) for e in range(n_ep)]}


def _ema_of_params(decay: float) -> optax.GradientTransformation:
    """A transformation that leaves the updates alone and keeps an EMA of the updated params."""

    def init(params):
        return jax.tree.map(jnp.copy, params)

    def update(updates, state, params):
        new = optax.apply_updates(params, updates)
        return updates, jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state, new)

    return optax.GradientTransformation(init, update)


def ema(data, decays: list[float]) -> dict:
    images, labels, _ = data
    cfg, key, box = RECIPE, jax.random.key(RECIPE.seed), images.shape[1]
    adam = lambda lr: optax.chain(_ADAM(lr), *[_ema_of_params(d) for d in decays])
    _with_adam(adam)
    tr, va = training.split_train_val(key, labels, cfg.validation_fraction)
    train_images, val_images, y_tr, y_va = jnp.asarray(images[tr]), images[va], labels[tr], labels[va]
    model = cnn.build_model(cnn.architecture(cfg, box, 1), cfg.conv_impl)
    n_steps = math.ceil(cfg.images_per_region / cfg.batch_size)
    epoch_one, _ = training._region_epoch_fn(model, float(cfg.learning_rate), n_steps, cfg.batch_size, float(cfg.max_shift_frac * box))
    logits_fn, tx = training._logits_fn(model), adam(cfg.learning_rate)
    res = {}
    for r, v in zip(REGIONS, training.init_region_params(key, cfg, box, len(REGIONS), REGIONS)):
        params, stats = v["params"], v["batch_stats"]
        opt = tx.init(params)
        pos, neg = np.flatnonzero(y_tr == r), np.flatnonzero(y_tr != r)
        idx = (jnp.asarray(training._padded(pos, y_tr.size)), jnp.int32(pos.size), jnp.asarray(training._padded(neg, y_tr.size)), jnp.int32(neg.size))
        y = (y_va == r).astype(np.float32)
        rows = []
        for e in range(cfg.epochs):  # the same epochs, keys and batches as train_regions
            params, stats, opt, _, _ = epoch_one(params, stats, opt, train_images, *idx, training._epoch_key(key, r, e))
            row = []
            for p in [params, *opt[1:]]:  # raw, then one EMA per decay
                logits = training._chunked_logits(logits_fn, {"params": p, "batch_stats": stats}, val_images, 256)
                row.append(round(training._balanced_val(logits[:, 0], y)[1], 3))
            rows.append(row)
        res[r] = rows
    return {"decays": decays, "val_acc_raw_then_ema_per_epoch": res}


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("schedule", "shared", "ema"):
        raise SystemExit(__doc__)
    data = whole_job.make_data(8400, 32, 0.5, 0)
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "ema":
        print(json.dumps(ema(data, [float(d) for d in args])), flush=True)
        return
    for spec in args:
        print(json.dumps((schedule if kind == "schedule" else shared)(data, spec), default=float), flush=True)


if __name__ == "__main__":
    main()
