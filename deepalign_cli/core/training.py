"""Training the region classifiers: every region's net (the paper) or the polar trunk, in one run.

Recipe (paper §2.2/§3): region r's net sees positives = the labelled particles of r, negatives = all
other labelled particles, in balanced batches (``batch_size // 2`` positives, the rest negatives,
drawn uniformly with replacement), each image randomly rotated and shifted on the device
(`core.augment`), ``ceil(images_per_region / batch_size)`` Adam steps per epoch, binary
cross-entropy on logits (``optax.sigmoid_binary_cross_entropy``).

* **Validation**: a ``validation_fraction`` of every region's particles (`core.split`) is held
  out, never augmented. Validation loss/accuracy of a head are *balanced*: the mean of the
  positive- and negative-class values, matching the balanced training distribution (the raw
  negative share is (R − 1)/R, so plain accuracy would reward "always no").
* **Early stopping** on the validation loss (``early_stopping_patience`` epochs without
  improvement; 0 disables); the variables of the best epoch are returned, not the last.
* **RNG**: region r's stream is ``fold_in(key, r)``; its init uses ``fold_in(·, 0)`` and epoch e
  ``fold_in(·, 1 + e)``, so a region's result is the same whether it is trained alone, with other
  regions, in a loop or vmapped, and after ``--resume`` (no key has to be stored).
* **Formulation** (``region_parallel``): on one device, CPU or GPU, a Python loop over regions of
  one jitted step (shared by all regions: the index arrays are padded to one length), each group
  of steps' batches made in one call ahead of the updates (`_pre_batched_epoch`). Vmapping the
  regions turns every convolution into a grouped one (3–10× slower on CPU; on an H100 42 vmapped
  regions 22,600 vs one region 31,300 image-steps/s), so "auto" vmaps only over several devices,
  splitting the stacked region axis over a 1-D mesh (``core.devices``, ``shard_map``, no
  collectives; padded regions' outputs dropped). Measurements: RESULTS.md, "On one GPU".
* **Polar trunk** (``model: polar_trunk``, `polar.PolarCNN`, beyond the paper): one network with
  a head per region; each batch is drawn stratified over all labels (every image is a positive
  for its own head and a negative for the others) and augmented on the polar grid
  (`polar.polar_augment`); loss = mean over heads of the balanced BCE. An epoch has
  ``ceil(images_per_region · n_labels / (2 · batch_size))`` steps, so every head sees as many
  positives per epoch as a per-region net. Its regions train, stop and resume together (the
  resume unit `TRUNK`).

Regions with fewer than ``min_positives`` training positives (or no negatives) are skipped with a
warning in their result entry; they never raise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import DeepAlignError
from . import batches, cnn, devices, inference, models, synthetic
from .split import split_train_val

TRUNK = "trunk"  # the training unit (resume state, RNG stream) of a one-net model: all its regions
_INIT_STREAM = 0
_TRUNK_STREAM = 2**20 + 1  # fold_in tag of the trunk's stream (outside the region ids and the split's tag)
_EVAL_CHUNK = 256  # validation images per jitted forward call


class TrainData(NamedTuple):
    """The split labelled images: training images on the device, validation images on the host."""

    train_images: jax.Array  # (n_train, N, N)
    y_train: np.ndarray  # (n_train,) region labels
    val_images: np.ndarray  # (n_val, N, N)
    y_val: np.ndarray  # (n_val,)

    @property
    def box(self) -> int:
        return int(self.train_images.shape[-1])


class Hooks(NamedTuple):
    """What a caller sees of a run: progress events, per-epoch checkpoints, states to resume."""

    progress: Callable[[dict], None] | None = None
    checkpoint: Callable[[int | str, int, dict], None] | None = None
    resume: dict | None = None


@flax.struct.dataclass
class RegionState:
    """A training unit's state (one region's net, or the trunk): current and best variables, the
    optimiser state, the metric history and the early-stopping counters."""

    params: Any
    batch_stats: Any
    opt_state: Any
    best_params: Any
    best_batch_stats: Any
    epoch: int = flax.struct.field(pytree_node=False, default=-1)
    history: tuple = flax.struct.field(pytree_node=False, default=())
    best_epoch: int = flax.struct.field(pytree_node=False, default=-1)
    best_val_loss: float = flax.struct.field(pytree_node=False, default=math.inf)
    bad_epochs: int = flax.struct.field(pytree_node=False, default=0)
    stopped: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def fresh(cls, variables: dict, tx) -> "RegionState":
        return cls(params=variables["params"], batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                   best_params=variables["params"], best_batch_stats=variables["batch_stats"])

    def to_dict(self) -> dict:
        """The serialisable form (what checkpoint hooks receive and resume files hold)."""
        return {"params": self.params, "batch_stats": self.batch_stats, "opt_state": self.opt_state, "epoch": self.epoch,
                "history": list(self.history), "best_params": self.best_params, "best_batch_stats": self.best_batch_stats,
                "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped}

    def restored(self, raw: dict) -> "RegionState":
        """This (fresh) state with a saved one's values: `to_dict` output, possibly round-tripped
        through the checkpoint bytes (plain nested dicts)."""
        arrays = {k: flax.serialization.from_state_dict(getattr(self, k), raw[k])
                  for k in ("params", "batch_stats", "opt_state", "best_params", "best_batch_stats")}
        return self.replace(**arrays, epoch=int(raw["epoch"]), history=tuple(_history_from_raw(raw.get("history", []))),
                            best_epoch=int(raw["best_epoch"]), best_val_loss=float(raw["best_val_loss"]),
                            bad_epochs=int(raw["bad_epochs"]), stopped=bool(raw["stopped"]))

    def result(self, arch: dict, head: int, history: Sequence[dict] | None = None) -> dict:
        """A trained region's entry (the best epoch's variables), as `train_regions` returns it."""
        return {"params": self.best_params, "batch_stats": self.best_batch_stats,
                "history": list(self.history if history is None else history), "best_epoch": self.best_epoch,
                "arch": arch, "head": head, "warning": None}


def _history_from_raw(h) -> list[dict]:
    if isinstance(h, dict):  # msgpack restores lists as {"0": …, "1": …}
        h = [h[k] for k in sorted(h, key=int)]
    return [{k: (None if v is None else (int(v) if k == "epoch" else float(v))) for k, v in e.items()} for e in h]


# --------------------------------------------------------------------------- data & sampling


def _padded(idx: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, np.int32)
    out[: idx.size] = idx
    return out


def _unit_key(key: jax.Array, unit: int | str) -> jax.Array:
    return jax.random.fold_in(key, _TRUNK_STREAM if unit == TRUNK else unit)


def _epoch_key(key: jax.Array, unit: int | str, epoch: int) -> jax.Array:
    return jax.random.fold_in(_unit_key(key, unit), 1 + epoch)


def init_region_params(key: jax.Array, cfg: Any, box: int, n_regions: int, region_ids: Sequence[int] | None = None) -> list:
    """Initial variables {"params", "batch_stats"} of every region's network.

    per_region: a list of n_regions variable dicts, region r initialised from fold_in(fold_in(key, r), 0)
    (r = region_ids[i], default i). A one-net model: a one-element list, one net with n_regions
    heads, initialised from the stream of `TRUNK`."""
    arch = models.architecture(cfg, box, n_regions)
    model = models.build(arch, "direct")
    init = lambda unit: cnn.init_variables(jax.random.fold_in(_unit_key(key, unit), _INIT_STREAM), model, box)  # noqa: E731
    if models.get(cfg.model).one_net:
        return [init(TRUNK)]
    return [init(r) for r in (list(region_ids) if region_ids is not None else range(n_regions))]


# --------------------------------------------------------------------------- jitted pieces


def _bce_acc(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    return optax.sigmoid_binary_cross_entropy(logits, y), ((logits > 0) == (y > 0.5)).astype(jnp.float32)


def _apply_train(model, params, batch_stats, x, key):
    logits, upd = model.apply(
        {"params": params, "batch_stats": batch_stats}, x[..., None], train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    return logits, upd.get("batch_stats", batch_stats)


def _region_update_body(model: nn.Module, lr: float):
    """One Adam step of one per-region net on a given batch x (B, N, N), targets y (not jitted)."""
    tx = optax.adam(lr)

    def update(params, batch_stats, opt_state, x, y, k_drop):
        def loss_fn(p):
            logits, new_bs = _apply_train(model, p, batch_stats, x, k_drop)
            loss, acc = _bce_acc(logits[:, 0], y)
            return loss.mean(), (new_bs, acc.mean())

        (loss, (new_bs, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_bs, opt_state, loss, acc

    return update


def _region_step_body(model: nn.Module, lr: float, batch_size: int, max_shift_px: float, n_synthetic: int = 0):
    """One Adam step of one per-region net on a balanced, augmented batch (not jitted)."""
    update = _region_update_body(model, lr)

    def step(params, batch_stats, opt_state, images, pos_idx, n_pos, neg_idx, n_neg, gen, region, k):
        x, y, k_drop = batches.region_batch(images, pos_idx, n_pos, neg_idx, n_neg, gen, region, k, batch_size, max_shift_px, n_synthetic)
        return update(params, batch_stats, opt_state, x, y, k_drop)

    return step


# Steps whose batches the loop formulation makes in one call, bounded by _BATCH_GROUP_BYTES.
_BATCH_GROUP_STEPS = 8
_BATCH_GROUP_BYTES = 64 * 2**20


def _batch_group_steps(batch_size: int, box: int) -> int:
    return int(max(1, min(_BATCH_GROUP_STEPS, _BATCH_GROUP_BYTES // (4 * batch_size * box * box))))


def _pre_batched_epoch(update, make_batches, n_steps: int, batch_size: int, group: int | None = None, stacked: bool = False):
    """The loop formulation's epoch: the batches of `group` steps made in one jitted call (the
    same keys, so the same batches as the fused step of `_stepwise_epoch`), then one jitted update
    per step. Inside the jitted step, sampling and augmentation cost ~5 ms of a 32-px CPU step
    against < 0.5 ms on their own (RESULTS.md, "Small-box training and prediction").

    The last group is padded with repeated keys (their batches are unused), so one compiled batch
    maker serves every group. group: default `_batch_group_steps` of the images' box, at most
    n_steps. make_batches(*data, keys) -> (xs, ys, dropout keys), one per key;
    update(params, batch_stats, opt_state, x, y, k_drop) -> (…, loss, acc); the epoch's loss/acc
    are the means over steps (per head for the polar trunk).
    stacked: R nets at once (the vmapped formulation): key is (R,) keys, each region's step keys
    ``split(key_r, n_steps)`` as in the loop (so the same batches), make_batches(*data, ks (R, g))
    returns (g, R, …) and update is vmapped over regions; loss/acc per region."""

    def epoch(params, batch_stats, opt_state, *rest):
        *data, key = rest
        n_nets = key.shape[0] if stacked else 1
        g = group or min(n_steps, max(1, _batch_group_steps(batch_size, data[0].shape[-1]) // n_nets))
        keys = jax.vmap(lambda k: jax.random.split(k, n_steps))(key) if stacked else jax.random.split(key, n_steps)
        losses, accs = [], []
        for start in range(0, n_steps, g):
            ks = keys[:, start : start + g] if stacked else keys[start : start + g]
            short = g - ks.shape[int(stacked)]
            if short:
                last = ks[:, -1:] if stacked else ks[-1:]
                ks = jnp.concatenate([ks, jnp.repeat(last, short, axis=int(stacked))], axis=int(stacked))
            xs, ys, kds = make_batches(*data, ks)
            for i in range(min(g, n_steps - start)):
                params, batch_stats, opt_state, loss, acc = update(params, batch_stats, opt_state, xs[i], ys[i], kds[i])
                losses.append(loss)
                accs.append(acc)
        return params, batch_stats, opt_state, jnp.stack(losses).mean(0), jnp.stack(accs).mean(0)

    return epoch


def _stepwise_epoch(step, n_steps: int, stacked: bool = False):
    """An epoch as a Python loop over a jitted step (the fused step: batch making inside it).

    Not ``lax.scan``: on XLA:CPU a scanned epoch ran 25× slower than the same step jitted alone
    (RESULTS.md, "Training and prediction speed"). The step keys are ``split(key, n_steps)`` (per
    region when ``stacked``), so results do not depend on how an epoch is cut. Returns (params,
    batch_stats, opt_state, mean loss, mean acc)."""

    def epoch(params, batch_stats, opt_state, *rest):
        *data, key = rest
        keys = jax.vmap(lambda k: jax.random.split(k, n_steps))(key) if stacked else jax.random.split(key, n_steps)
        losses, accs = [], []
        for i in range(n_steps):
            k = keys[:, i] if stacked else keys[i]
            params, batch_stats, opt_state, loss, acc = step(params, batch_stats, opt_state, *data, k)
            losses.append(loss)
            accs.append(acc)
        ax = 1 if stacked else 0
        return params, batch_stats, opt_state, jnp.stack(losses, ax).mean(ax), jnp.stack(accs, ax).mean(ax)

    return epoch


_EPOCH_IN_AXES = (0, 0, 0, None, 0, 0, 0, 0, None, 0, 0)  # vmap over regions; the image set and generator are shared


@lru_cache(maxsize=32)
def _region_epoch_fn(model: nn.Module, lr: float, n_steps: int, batch_size: int, max_shift_px: float, n_synthetic: int = 0):
    """One epoch of one per-region net and of R stacked nets (vmapped over regions), both with
    their batches made ahead (`_pre_batched_epoch`)."""
    batch = partial(batches.region_batch, batch_size=batch_size, max_shift_px=max_shift_px, n_synthetic=n_synthetic)
    update = _region_update_body(model, lr)
    one = _pre_batched_epoch(jax.jit(update), jax.jit(jax.vmap(batch, in_axes=(None,) * 7 + (0,))), n_steps, batch_size)
    # stacked: regions (axis 0 of the index arrays, region ids and keys) inside, steps (keys' axis 1) outside
    make_many = jax.vmap(jax.vmap(batch, in_axes=(None, 0, 0, 0, 0, None, 0, 0)), in_axes=(None,) * 7 + (1,))
    many = _pre_batched_epoch(jax.jit(jax.vmap(update)), jax.jit(make_many), n_steps, batch_size, stacked=True)
    return one, many


@lru_cache(maxsize=32)
def _region_epoch_sharded_fn(model: nn.Module, lr: float, n_steps: int, batch_size: int, max_shift_px: float, mesh, n_synthetic: int = 0):
    """The vmapped epoch with the region axis split over ``mesh`` ("regions"): every device runs
    the vmapped step on its slice of regions (``shard_map``); the images and generator are replicated."""
    step = jax.vmap(_region_step_body(model, lr, batch_size, max_shift_px, n_synthetic), in_axes=_EPOCH_IN_AXES)
    ax, rep = devices.P(devices.REGION_AXIS), devices.P()
    return _stepwise_epoch(jax.jit(devices.shard_map(step, mesh, in_specs=(ax, ax, ax, rep, ax, ax, ax, ax, rep, ax, ax), out_specs=ax)),
                           n_steps, stacked=True)


@lru_cache(maxsize=32)
def _trunk_epoch_fn(model: nn.Module, lr: float, n_steps: int, batch_size: int, max_shift_px: float, n_synthetic: int = 0):
    """One epoch of a one-net model (the polar trunk): batches stratified over labels, made ahead
    in groups of steps as for the per-region nets (`_pre_batched_epoch`), then one jitted update
    per step; loss = mean over heads of the balanced BCE. Returns per-head (H,) train loss/acc."""
    make = jax.vmap(partial(batches.trunk_batch, batch_size=batch_size, max_shift_px=max_shift_px, n_synthetic=n_synthetic),
                    in_axes=(None,) * 6 + (0,))
    return _pre_batched_epoch(jax.jit(_trunk_update_body(model, lr)), jax.jit(make), n_steps, batch_size)


def _trunk_update_body(model: nn.Module, lr: float):
    """One Adam step of the trunk on a given batch (not jitted)."""
    tx = optax.adam(lr)

    def update(params, batch_stats, opt_state, x, y, k_drop):
        def loss_fn(p):
            logits, new_bs = _apply_train(model, p, batch_stats, x, k_drop)
            head_loss, acc = _balanced_per_head(logits, y)
            return head_loss.mean(), (new_bs, head_loss, acc)

        (_, (new_bs, loss, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_bs, opt_state, loss, acc

    return update


def _balanced_per_head(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-head balanced BCE and accuracy: ½ mean over positives + ½ mean over negatives.

    logits, y: (B, H).  Returns (H,), (H,); a class absent from the batch contributes its weight
    to the other class."""
    loss, acc = _bce_acc(logits, y)
    n_pos, n_neg = y.sum(0), (1 - y).sum(0)
    w_pos = jnp.where(n_neg > 0, 0.5, 1.0) * jnp.where(n_pos > 0, 1.0, 0.0) / jnp.maximum(n_pos, 1)
    w_neg = jnp.where(n_pos > 0, 0.5, 1.0) * jnp.where(n_neg > 0, 1.0, 0.0) / jnp.maximum(n_neg, 1)
    w = y * w_pos + (1 - y) * w_neg
    return (w * loss).sum(0), (w * acc).sum(0)



def vmap_region_groups(regions: Sequence[int], batch_size: int, box: int, first_channels: int, device_bytes: int | None,
                       n_devices: int = 1) -> list[list[int]]:
    """The regions cut into as few groups of near-equal size as keep each group's stacked training
    step (batch_size images per region) within `inference.VMAP_DEVICE_FRACTION` of each device's memory, at
    `inference.VMAP_BYTES_PER_PX_CHANNEL` (XLA:CPU's buffer assignment of this step needs 16.8 B at 120 px,
    cuFFT's work area ~5.5 B more). One group where the backend reports no limit; 42 regions at
    120 px on an H100 (measured to run together) stay one group."""
    regions = list(regions)
    if not device_bytes or not regions:
        return [regions] if regions else []
    per_region = batch_size * box * box * first_channels * inference.VMAP_BYTES_PER_PX_CHANNEL
    fit = max(1, int(inference.VMAP_DEVICE_FRACTION * device_bytes // per_region)) * max(1, n_devices)
    n_groups = math.ceil(len(regions) / fit)
    size = math.ceil(len(regions) / n_groups)
    return [regions[i : i + size] for i in range(0, len(regions), size)]



# --------------------------------------------------------------------------- driver


def _use_vmap(cfg: Any) -> bool:
    """Training formulation: "auto" vmaps the regions only off CPU over several devices (the
    region axis split over them); on one device, CPU or GPU, the loop was measured faster."""
    if cfg.region_parallel == "auto":
        return jax.default_backend() != "cpu" and devices.region_mesh() is not None
    return cfg.region_parallel == "vmap"


def head_validation(val_logits: np.ndarray, y_val: np.ndarray, heads: Sequence[int]) -> list[tuple[float | None, float | None]]:
    """Per head (region `heads[j]` is column j of val_logits (n_val, H)): balanced validation loss
    and accuracy; (None, None) without validation images."""
    if y_val.size == 0:
        return [(None, None)] * len(heads)
    y = (y_val[:, None] == np.asarray(heads)[None, :]).astype(np.float32)
    loss, acc = _balanced_per_head(jnp.asarray(val_logits), jnp.asarray(y))
    return [(float(a), float(b)) for a, b in zip(np.asarray(loss), np.asarray(acc))]


def end_epoch(state: RegionState, epoch: int, train_loss, train_acc, per_head_val, patience: int) -> RegionState:
    """Record an epoch (validation: the mean over the unit's heads) and keep the best variables by
    validation (or, without one, training) loss; stop after `patience` epochs without improvement."""
    losses = [v[0] for v in per_head_val if v[0] is not None]
    accs = [v[1] for v in per_head_val if v[1] is not None]
    val_loss = float(np.mean(losses)) if losses else None
    val_acc = float(np.mean(accs)) if accs else None
    entry = {"epoch": epoch, "train_loss": float(train_loss), "train_acc": float(train_acc), "val_loss": val_loss, "val_acc": val_acc}
    state = state.replace(epoch=epoch, history=state.history + (entry,))
    monitor = float(train_loss) if val_loss is None else val_loss
    if monitor < state.best_val_loss:
        return state.replace(best_val_loss=monitor, best_epoch=epoch, best_params=state.params,
                             best_batch_stats=state.batch_stats, bad_epochs=0)
    bad = state.bad_epochs + 1
    return state.replace(bad_epochs=bad, stopped=patience > 0 and bad >= patience)


def train_regions(images, labels, region_ids: Sequence[int], cfg: Any, key: jax.Array,
                  progress: Callable[[dict], None] | None = None, resume_state: dict | None = None,
                  checkpoint_cb: Callable[[int | str, int, dict], None] | None = None,
                  generator: synthetic.Generator | None = None) -> dict:
    """Train the classifiers of `region_ids` together.

    images: (n, N, N) float32, normalised (numpy or memmap).  labels: (n,) int region of every
    image (all regions, not only the selected ones: the others are negatives).  cfg: TrainConfig.
    key: jax PRNG key (e.g. ``jax.random.key(cfg.seed)``).
    progress: called with {"event": "epoch", "regions" (the regions this epoch trained), "epoch",
      "epochs", "train_loss", "train_acc", "val_loss", "val_acc", "images" (augmented images
      trained on), "seconds" (wall time of that epoch incl. validation), "stopped"} after every
      epoch of a training unit and with {"event": "skipped", "region", "warning"} for skipped regions.
    checkpoint_cb: called (unit, epoch, state dict) after every epoch; the unit is the region, or
      `TRUNK` for a one-net model; the state dict (`RegionState.to_dict`) holds the current and
      best variables, the optimiser state and the history.
    resume_state: {unit: state dict} as passed to checkpoint_cb, possibly round-tripped through
      the checkpoint bytes; training continues after its last epoch.
    generator: None, or the `synthetic.Generator` of the reference: ``cfg.synthetic_fraction`` of
      every training batch is then new synthetic particles made inside the jitted batch maker; the
      validation part (early stopping, `predict --coverage`'s calibration) stays real particles alone.
      A one-net model then trains every region, also those with fewer than min_positives labelled.
    Returns {region: {"params", "batch_stats", "history": [{epoch, train_loss, train_acc, val_loss,
      val_acc}], "best_epoch", "arch", "head", "warning"}} — the best-epoch variables; a skipped
      region has params None and a warning string.
    """
    images = np.asarray(images, np.float32) if not isinstance(images, np.ndarray) else images
    labels = np.asarray(labels).astype(np.int64)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise DeepAlignError(f"training images: expected (n, N, N), got shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise DeepAlignError(f"training labels: {labels.shape[0]} labels for {images.shape[0]} images")
    split = split_train_val(key, labels, cfg.validation_fraction)
    data = TrainData(jnp.asarray(np.asarray(images[split.train], np.float32)), labels[split.train], np.asarray(images[split.val], np.float32),
                     labels[split.val])
    hooks = Hooks(progress, checkpoint_cb, resume_state or {})

    results: dict[int, dict] = {}
    active = []
    # with synthetic examples a one-net model's head learns a region that has no labelled particles
    # (the generator makes its positives); a per-region net's balanced batches need real positives
    need = 0 if models.get(cfg.model).one_net and _n_synthetic(cfg, generator) else max(1, cfg.min_positives)
    for r in sorted(int(r) for r in region_ids):
        n_pos = int((data.y_train == r).sum())
        n_neg = int(data.y_train.size - n_pos)
        if n_pos < need or n_neg == 0:
            why = f"{n_pos} training particles" if n_neg else "no particles of other regions"
            warning = f"region {r}: {why} (min_positives = {cfg.min_positives}); skipped"
            results[r] = {"params": None, "batch_stats": None, "history": [], "best_epoch": -1, "arch": None, "head": None, "warning": warning}
            if progress:
                progress({"event": "skipped", "region": r, "warning": warning})
        else:
            active.append(r)
    if not active:
        return results
    arch = models.architecture(cfg, data.box, len(active))
    model = models.build(arch, cfg.conv_impl)
    train = _train_trunk if models.get(cfg.model).one_net else _train_per_region
    results.update(train(data, active, cfg, key, model, arch, hooks, generator))
    return results


def _report(hooks: Hooks, unit: int | str, regions: list[int], state: RegionState, cfg, n_images: int, t0: float) -> None:
    if hooks.checkpoint:
        hooks.checkpoint(unit, state.epoch, state.to_dict())
    if hooks.progress:
        hooks.progress({"event": "epoch", "regions": regions, "epoch": state.epoch, "epochs": cfg.epochs, **state.history[-1],
                        "images": n_images, "seconds": time.perf_counter() - t0, "stopped": state.stopped})


def _n_synthetic(cfg, gen) -> int:
    """Synthetic images per batch: train.synthetic_fraction of it when there is a generator."""
    return 0 if gen is None else int(round(models.synthetic_fraction(cfg) * cfg.batch_size))


def _train_per_region(data: TrainData, regions: list[int], cfg, key, model: nn.Module, arch: dict, hooks: Hooks, gen=None) -> dict:
    tx = optax.adam(cfg.learning_rate)
    n_steps = math.ceil(cfg.images_per_region / cfg.batch_size)
    max_shift_px = float(cfg.max_shift_frac * data.box)
    n_syn = _n_synthetic(cfg, gen)
    epoch_one, epoch_many = _region_epoch_fn(model, float(cfg.learning_rate), n_steps, cfg.batch_size, max_shift_px, n_syn)
    logits_fn = inference.logits_fn(model)
    n_train = data.y_train.size

    inits = init_region_params(key, cfg, data.box, len(regions), regions)
    states, index = {}, {}
    for r, variables in zip(regions, inits):
        state = RegionState.fresh(variables, tx)
        states[r] = state.restored(hooks.resume[r]) if r in hooks.resume else state
        pos, neg = np.flatnonzero(data.y_train == r), np.flatnonzero(data.y_train != r)
        index[r] = (jnp.asarray(_padded(pos, n_train)), jnp.int32(pos.size), jnp.asarray(_padded(neg, n_train)), jnp.int32(neg.size),
                    jnp.int32(r))

    use_vmap = _use_vmap(cfg)
    mesh = devices.region_mesh() if use_vmap else None  # None on one device: unchanged path
    epoch_sharded = (_region_epoch_sharded_fn(model, float(cfg.learning_rate), n_steps, cfg.batch_size, max_shift_px, mesh, n_syn)
                     if mesh is not None else None)
    for epoch in range(min(states[r].epoch for r in regions) + 1, cfg.epochs):
        todo = [r for r in regions if not states[r].stopped and states[r].epoch < epoch]
        if not todo:
            break
        outs = _vmapped_epochs(todo, states, index, data, gen, key, epoch, cfg, model, mesh, epoch_many, epoch_sharded) if use_vmap else {}
        for r in todo:
            t0 = time.perf_counter()
            if use_vmap:
                params, bstats, opt_state, tl, ta = outs[r]
            else:
                s = states[r]
                pos, n_pos, neg, n_neg, region = index[r]
                params, bstats, opt_state, tl, ta = epoch_one(s.params, s.batch_stats, s.opt_state, data.train_images, pos, n_pos, neg,
                                                              n_neg, gen, region, _epoch_key(key, r, epoch))
                tl = float(tl)  # waits for the epoch, so "seconds" is its duration
            state = states[r].replace(params=params, batch_stats=bstats, opt_state=opt_state)
            val_logits = inference.chunked_logits(logits_fn, {"params": params, "batch_stats": bstats}, data.val_images, _EVAL_CHUNK)
            states[r] = end_epoch(state, epoch, tl, ta, head_validation(val_logits, data.y_val, [r]), cfg.early_stopping_patience)
            _report(hooks, r, [r], states[r], cfg, n_steps * cfg.batch_size, t0)
    return {r: s.result(arch, 0) for r, s in states.items()}


def _vmapped_epochs(todo, states, index, data: TrainData, gen, key, epoch: int, cfg, model, mesh, epoch_many, epoch_sharded) -> dict:
    """One epoch of the regions `todo`, vmapped in groups that fit the device(s) (`vmap_region_groups`),
    the stacked region axis split over `mesh` when there is one. Returns {region: (params,
    batch_stats, opt_state, train loss, train acc)}."""
    outs = {}
    groups = vmap_region_groups(todo, cfg.batch_size, data.box, model.conv_filters[0], devices.memory_bytes(), devices.mesh_size(mesh))
    for group in groups:
        members = group if mesh is None else group + [group[0]] * (devices.pad_to_multiple(len(group), devices.mesh_size(mesh)) - len(group))
        place = (lambda t: t) if mesh is None else (lambda t: devices.shard_leading(t, mesh, devices.REGION_AXIS))
        stack = lambda name: place(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[getattr(states[r], name) for r in members]))  # noqa: E731
        pos, n_pos, neg, n_neg, region = [place(jnp.stack([index[r][i] for r in members])) for i in range(5)]
        keys = place(jnp.stack([_epoch_key(key, r, epoch) for r in members]))
        if mesh is None:
            out = epoch_many(stack("params"), stack("batch_stats"), stack("opt_state"), data.train_images, pos, n_pos, neg, n_neg, gen,
                             region, keys)
        else:
            out = epoch_sharded(stack("params"), stack("batch_stats"), stack("opt_state"), devices.replicate(data.train_images, mesh),
                                pos, n_pos, neg, n_neg, devices.replicate(gen, mesh), region, keys)
            # gathered to the host and back onto the default device, uncommitted like the
            # single-device results (per-region arrays of different devices could not be stacked)
            out = jax.tree_util.tree_map(jnp.asarray, jax.device_get(out))
        outs.update({r: jax.tree_util.tree_map(lambda a, i=i: a[i], out) for i, r in enumerate(group)})
    return outs


def _train_trunk(data: TrainData, regions: list[int], cfg, key, model: nn.Module, arch: dict, hooks: Hooks, gen=None) -> dict:
    tx = optax.adam(cfg.learning_rate)
    present = np.unique(data.y_train)
    n_steps = math.ceil(cfg.images_per_region * present.size / (2 * cfg.batch_size))
    n_syn = _n_synthetic(cfg, gen)
    epoch_fn = _trunk_epoch_fn(model, float(cfg.learning_rate), n_steps, cfg.batch_size, float(cfg.max_shift_frac * data.box), n_syn)
    logits_fn = inference.logits_fn(model)
    groups = [np.flatnonzero(data.y_train == lab) for lab in present]
    members = jnp.asarray(np.stack([_padded(g, max(x.size for x in groups)) for g in groups]))
    counts = jnp.asarray(np.array([g.size for g in groups], np.int32))
    y_train, heads = jnp.asarray(data.y_train.astype(np.int32)), jnp.asarray(np.array(regions, np.int32))

    state = RegionState.fresh(init_region_params(key, cfg, data.box, len(regions))[0], tx)
    if TRUNK in hooks.resume:
        state = state.restored(hooks.resume[TRUNK])
    head_history: dict[int, list] = {r: [] for r in regions}  # per-region curves of the resumed run's epochs
    for epoch in range(state.epoch + 1, cfg.epochs):
        if state.stopped:
            break
        t0 = time.perf_counter()
        params, bstats, opt_state, tl, ta = epoch_fn(state.params, state.batch_stats, state.opt_state, data.train_images,
                                                     members, counts, y_train, heads, gen, _epoch_key(key, TRUNK, epoch))
        state = state.replace(params=params, batch_stats=bstats, opt_state=opt_state)
        val_logits = inference.chunked_logits(logits_fn, {"params": params, "batch_stats": bstats}, data.val_images, _EVAL_CHUNK)
        per_head = head_validation(val_logits.reshape(-1, len(regions)), data.y_val, regions)
        state = end_epoch(state, epoch, np.mean(tl), np.mean(ta), per_head, cfg.early_stopping_patience)
        for j, r in enumerate(regions):
            head_history[r].append({"epoch": epoch, "train_loss": float(tl[j]), "train_acc": float(ta[j]),
                                    "val_loss": per_head[j][0], "val_acc": per_head[j][1]})
        _report(hooks, TRUNK, regions, state, cfg, n_steps * cfg.batch_size, t0)
    return {r: state.result(arch, j, head_history[r]) for j, r in enumerate(regions)}
