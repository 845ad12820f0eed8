"""Levers tried against the whole-job target (`whole_job.py`) for the per-region nets: a
learning-rate schedule and weight averaging. A one-off study (2026-11-26; RESULTS.md, "Whole
training job"); nothing here is a `deepalign` option.

    .venv/bin/python benchmarks/experiments/whole_job_levers.py schedule cosine,2,10000,2e-3 const,3,10000,2e-3
    .venv/bin/python benchmarks/experiments/whole_job_levers.py ema 0.99 0.998

Data as in `whole_job.py` (8,400 labelled particles simulated from the shipped map, 32 px,
SNR 0.5, 42 regions, the stratified 80/20 split of `core.split`, key 0) and its three typical
regions 20, 25, 33. `train_regions` trains with Adam at the config's constant rate, so the nets
here are trained by a loop of this script's own from the same public pieces
(`train_predict.region_train_step`: `batches.balanced_batch`, `augment.augment`, the net's
train-mode apply, an optax update; `training.init_region_params`; balanced validation accuracy by
`training.head_validation` after every epoch). Its step keys are not `train_regions`' own, so the
figures compare within this script, not digit for digit with the product's runs (the runs in
RESULTS.md swapped the optimiser inside the product's epoch; that version, and the `shared`
experiment on the removed shared-trunk model, are in git history). Each experiment prints one
JSON line per run and writes benchmarks/results/whole_job_levers.json (`_harness.write_result`):
* `schedule SCHED,EPOCHS,IMAGES,LR …`: Adam at a learning-rate schedule over the whole run
  (const; cosine: `optax.cosine_decay_schedule`; warmcos: 10 % linear warm-up then cosine).
* `ema DECAY …`: constant rate, with exponential moving averages of the weights (updated after
  every Adam step) evaluated beside the raw weights after every epoch (the net's running batch
  statistics for all).
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # before JAX starts

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import whole_job  # noqa: E402
from _harness import write_result  # noqa: E402
from train_predict import region_train_step  # noqa: E402

from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import inference, models, training  # noqa: E402
from deepalign_cli.core.split import split_train_val  # noqa: E402

REGIONS = [20, 25, 33]
RECIPE = TrainConfig(epochs=10, images_per_region=10000, early_stopping_patience=0, seed=0)
EVAL_CHUNK = 256


def _schedule(name: str, lr: float, total: int):
    if name == "const":
        return lr
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, total)
    if name == "warmcos":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, total // 10), total)
    raise SystemExit(f"unknown schedule {name!r}: const, cosine or warmcos")


def _padded(idx: np.ndarray, length: int) -> jax.Array:
    out = np.zeros(length, np.int32)
    out[: idx.size] = idx
    return jnp.asarray(out)


def train_per_region(data, cfg: TrainConfig, tx, averages=lambda opt_state: []) -> tuple[dict, dict]:
    """Train REGIONS' nets with optimiser `tx`; after every epoch the balanced validation accuracy
    of the raw weights and of each parameter tree that `averages(opt_state)` returns.
    Returns ({region: [[val acc raw, val acc of each average…] per epoch]},
    {region: [mean train loss per epoch]})."""
    images, labels, _ = data
    key, box = jax.random.key(cfg.seed), images.shape[1]
    split = split_train_val(key, labels, cfg.validation_fraction)
    train_images, y_tr = jnp.asarray(images[split.train]), labels[split.train]
    val_images, y_va = images[split.val], labels[split.val]
    model = models.build(models.architecture(cfg, box, 1), cfg.conv_impl)
    step = jax.jit(region_train_step(model, tx, cfg.batch_size, float(cfg.max_shift_frac * box)))
    logits_fn = inference.logits_fn(model)
    n_steps = math.ceil(cfg.images_per_region / cfg.batch_size)
    accs, losses = {}, {}
    for r, v in zip(REGIONS, training.init_region_params(key, cfg, box, len(REGIONS), REGIONS)):
        params, stats, opt = v["params"], v["batch_stats"], tx.init(v["params"])
        pos, neg = np.flatnonzero(y_tr == r), np.flatnonzero(y_tr != r)
        idx = (_padded(pos, y_tr.size), jnp.int32(pos.size), _padded(neg, y_tr.size), jnp.int32(neg.size))
        accs[r], losses[r] = [], []
        for e in range(cfg.epochs):
            epoch_loss = []
            for k in jax.random.split(jax.random.fold_in(jax.random.fold_in(key, r), 1 + e), n_steps):
                params, stats, opt, loss = step(params, stats, opt, train_images, *idx, k)
                epoch_loss.append(loss)
            row = []
            for p in [params, *averages(opt)]:
                logits = inference.chunked_logits(logits_fn, {"params": p, "batch_stats": stats}, val_images, EVAL_CHUNK)
                row.append(round(training.head_validation(logits, y_va, [r])[0][1], 3))
            accs[r].append(row)
            losses[r].append(round(float(jnp.mean(jnp.stack(epoch_loss))), 4))
    return accs, losses


def schedule(data, spec: str) -> dict:
    name, epochs, ipr, lr = spec.split(",")
    cfg = RECIPE.model_copy(update={"epochs": int(epochs), "images_per_region": int(ipr), "learning_rate": float(lr)})
    total = cfg.epochs * math.ceil(cfg.images_per_region / cfg.batch_size)
    t = time.perf_counter()
    accs, losses = train_per_region(data, cfg, optax.adam(_schedule(name, cfg.learning_rate, total)))
    return {"spec": spec, "seconds_per_region": (time.perf_counter() - t) / len(REGIONS),
            "val_acc": {r: [row[0] for row in accs[r]] for r in REGIONS}, "train_loss": losses}


def _ema_of_params(decay: float) -> optax.GradientTransformation:
    """A transformation that leaves the updates alone and keeps an EMA of the updated params."""

    def init(params):
        return jax.tree.map(jnp.copy, params)

    def update(updates, state, params):
        new = optax.apply_updates(params, updates)
        return updates, jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state, new)

    return optax.GradientTransformation(init, update)


def ema(data, decays: list[float]) -> dict:
    tx = optax.chain(optax.adam(RECIPE.learning_rate), *[_ema_of_params(d) for d in decays])
    accs, _ = train_per_region(data, RECIPE, tx, averages=lambda opt_state: list(opt_state[1:]))
    return {"decays": decays, "val_acc_raw_then_ema_per_epoch": accs}


def main() -> None:
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if len(sys.argv) < 3 or sys.argv[1] not in ("schedule", "ema"):
        raise SystemExit(__doc__)
    data = whole_job.make_data(8400, 32, 0.5, 0)
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "ema":
        runs = [ema(data, [float(d) for d in args])]
        print(json.dumps(runs[0]), flush=True)
    else:
        runs = []
        for spec in args:
            runs.append(schedule(data, spec))
            print(json.dumps(runs[-1], default=float), flush=True)
    print(f"→ {write_result('whole_job_levers', {'experiment': kind, 'args': args, 'runs': runs})}")

if __name__ == "__main__":
    main()
