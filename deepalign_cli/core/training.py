"""Training every region's classifier in one run, prediction, and pure checkpoint (de)serialisation.

Recipe (paper §2.2/§3): region r's net sees positives = the labelled particles of r, negatives = all
other labelled particles, in balanced batches (``batch_size // 2`` positives, the rest negatives,
drawn uniformly with replacement), each image randomly rotated and shifted on the device
(`core.augment`), ``ceil(images_per_region / batch_size)`` Adam steps per epoch, binary
cross-entropy on logits (``optax.sigmoid_binary_cross_entropy``).

* **Validation**: a ``validation_fraction`` of every region's particles (stratified by label, the
  split fixed by the key alone, so it does not depend on which regions are trained) is held out,
  never augmented. Validation loss/accuracy of region r are *balanced*: the mean of the positive-
  and negative-class values, matching the balanced training distribution (the raw negative share
  is (R − 1)/R, so plain accuracy would reward "always no").
* **Early stopping** on the validation loss (``early_stopping_patience`` epochs without
  improvement; 0 disables); the variables of the best epoch are returned, not the last.
* **RNG**: region r's stream is ``fold_in(key, r)``; its init uses ``fold_in(·, 0)`` and epoch e
  ``fold_in(·, 1 + e)``, so a region's result is the same whether it is trained alone, with other
  regions, in a loop or vmapped, and after ``--resume`` (no key has to be stored).
* **Formulation** (``region_parallel``), chosen by measurement. On XLA:CPU a loop over regions with
  one jitted step per call, looped in Python (a ``lax.scan`` epoch was 25× slower on XLA:CPU; the jitted step is shared by all regions because
  the index arrays are padded to one length) is fastest: vmapping per-region data over regions
  turns every convolution into a grouped convolution, 3–10× slower on CPU. On one GPU the loop
  wins too (H100, 120 px, 2026-11-26: one region 31,300 image-steps/s, the 42 regions vmapped
  22,600), so "auto" loops on any single device and vmaps (sharded) only over several devices.
  A shared augmented image pool for all regions (augment + input FFT once per
  step) was considered and rejected for the per-region nets: augmenting a 128-image batch costs
  1 ms at 64 px and 5 ms at 120 px against 400 ms / 2.5 s for the training step (measured on the
  2-core CPU), < 1 % to gain, at the price of unbalanced per-region batches. In the loop (and for
  the shared trunk) each group of steps' batches is made in one call ahead of the updates
  (`_pre_batched_epoch`): inside the jitted step the sampling and augmentation cost ~5 ms of a
  32-px step, on their own < 0.5 ms. The vmapped formulation makes its batches ahead likewise
  (the 22,600 above is the fused form's; the pre-batched vmapped form is not measured on a GPU).
* **Several devices** (``core.devices``). When ``jax.devices()`` has D > 1 devices, the vmapped
  formulation (training with ``region_parallel="vmap"`` or "auto" off CPU, and ``predict_probs``'
  vmap path; "auto" training vmaps only then) splits its stacked region axis over a 1-D mesh named "regions": the region count is
  padded to a multiple of D by repeating the first region (those outputs are dropped), every
  device runs the vmapped program on its R/D regions (``shard_map``, no collectives) and the
  images are replicated. A region's result therefore does not depend on D (its RNG stream is
  its own). The loop and shared-first-layer (predict) formulations and the shared trunk stay on
  the default device. With one device the single-device code path runs unchanged.
* **Shared trunk** (``model="shared_trunk"``, beyond the paper): one network with a head per region;
  each batch is drawn stratified over all labels (every image is a positive for its own head and a
  negative for the others), loss = mean over heads of the balanced (½ pos + ½ neg) BCE. An epoch
  has ``ceil(images_per_region · n_labels / (2 · batch_size))`` steps so every head sees as many
  positives per epoch as a per-region net.
* **Polar trunk** (``model="polar_trunk"``, beyond the paper, `polar.PolarCNN`): a shared trunk
  that is rotation-invariant by construction (polar resampling, circular convolutions, maximum
  over the angle); trained exactly as the shared trunk, except that each batch is augmented and
  resampled on the polar grid in one interpolation (`polar.polar_augment`). Evaluation and
  `predict_probs` feed it ordinary images (it resamples them itself).
* **Shared trunk, softmax** (``shared_loss="softmax"``): the same net and the same stratified
  batches (drawn only from labels that have a head; particles of other labels are not used), but
  the head logits are trained with one softmax cross-entropy on the region label, and
  ``predict_probs`` returns the softmax over the heads (rows sum to 1). The mode is stored in the
  model's ``arch`` dict (``arch["shared_loss"] == "softmax"``; absent for one-vs-rest, so those
  checkpoints are unchanged). Same number of steps per epoch as one-vs-rest. Metrics keep the
  history keys: loss = class-balanced cross-entropy (per head: the mean CE over images of that
  region; overall: the mean over heads); accuracy of head r = balanced accuracy of the decision
  "argmax == r" (½ recall + ½ specificity; argmax, not "p_r > 1/R", because it is the decision
  top-1 prediction makes). Early stopping monitors the class-balanced validation CE.

Regions with fewer than ``min_positives`` training positives (or no negatives) are skipped with a
warning in their result entry; they never raise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from ..errors import DeepAlignError
from . import augment as augment_mod
from . import cnn, coverage, devices, polar

SHARED_REGION = -1  # region id under which the shared-trunk model is checkpointed / resumed
_INIT_STREAM = 0
_SPLIT_STREAM = 2**20  # fold_in tag of the train/validation split (outside the region-id range)
_SHARED_STREAM = 2**20 + 1  # fold_in tag of the shared-trunk model's stream
_EVAL_CHUNK = 256  # validation images per jitted forward call


# --------------------------------------------------------------------------- data & sampling


def split_train_val(key: jax.Array, labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: round(fraction · n_l) of every label l to validation.

    labels: (n,) int.  Returns (train_idx, val_idx), sorted int64 index arrays. The split of a
    label depends only on (key, label, its members), not on the other labels."""
    labels = np.asarray(labels)
    k_split = jax.random.fold_in(key, _SPLIT_STREAM)
    train, val = [], []
    for lab in np.unique(labels):
        members = np.flatnonzero(labels == lab)
        # numpy's permutation, seeded by the label's JAX key: jax.random.permutation compiles
        # once per array length (10 labels: 1.4 s of the 2-core CPU's start-up)
        perm = np.random.default_rng(_key_words(jax.random.fold_in(k_split, int(lab)))).permutation(members.size)
        n_val = int(round(fraction * members.size))
        val.append(members[perm[:n_val]])
        train.append(members[perm[n_val:]])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _key_words(key: jax.Array) -> list[int]:
    """The uint32 words of a JAX PRNG key (typed or raw), e.g. to seed numpy."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(w) for w in np.asarray(data).ravel()]


def balanced_batch(
    key: jax.Array, pos_idx: jax.Array, n_pos: jax.Array, neg_idx: jax.Array, n_neg: jax.Array, batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """Indices and 0/1 targets of a batch with exactly batch_size // 2 positives.

    pos_idx, neg_idx: (M,) int, the first n_pos / n_neg entries valid (padding lets one compiled
    function serve every region).  Returns idx (batch_size,) int32, y (batch_size,) float32."""
    k_pos, k_neg = jax.random.split(key)
    half = batch_size // 2
    pos = pos_idx[jax.random.randint(k_pos, (half,), 0, n_pos)]
    neg = neg_idx[jax.random.randint(k_neg, (batch_size - half,), 0, n_neg)]
    y = jnp.concatenate([jnp.ones(half, jnp.float32), jnp.zeros(batch_size - half, jnp.float32)])
    return jnp.concatenate([pos, neg]), y


def _padded(idx: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, np.int32)
    out[: idx.size] = idx
    return out


# --------------------------------------------------------------------------- model state


def _region_key(key: jax.Array, region: int) -> jax.Array:
    return jax.random.fold_in(key, _SHARED_STREAM if region == SHARED_REGION else region)


def _epoch_key(key: jax.Array, region: int, epoch: int) -> jax.Array:
    return jax.random.fold_in(_region_key(key, region), 1 + epoch)


SHARED_MODELS = ("shared_trunk", "polar_trunk")  # one network with a head per region


def is_shared(cfg: Any) -> bool:
    """True for the models that train one network for all regions (`SHARED_MODELS`)."""
    return cfg.model in SHARED_MODELS


def _n_heads(cfg: Any, n_regions: int) -> int:
    return n_regions if is_shared(cfg) else 1


def model_architecture(cfg: Any, box: int, n_heads: int) -> dict:
    """The checkpoint's ``arch`` dict of cfg.model: `polar.architecture` for the polar trunk, else
    `cnn.architecture`."""
    if cfg.model == "polar_trunk":
        return polar.architecture(cfg, box, n_heads)
    return cnn.architecture(cfg, box, n_heads)


def init_region_params(key: jax.Array, cfg: Any, box: int, n_regions: int, region_ids: Sequence[int] | None = None) -> list:
    """Initial variables {"params", "batch_stats"} of every region's network.

    per_region: a list of n_regions variable dicts, region r initialised from fold_in(fold_in(key, r), 0)
    (r = region_ids[i], default i). shared_trunk: a one-element list, one net with n_regions heads,
    initialised from the stream of SHARED_REGION."""
    arch = model_architecture(cfg, box, _n_heads(cfg, n_regions))
    model = cnn.build_model(arch, "direct")
    if is_shared(cfg):
        return [cnn.init_variables(jax.random.fold_in(_region_key(key, SHARED_REGION), _INIT_STREAM), model, box)]
    ids = list(region_ids) if region_ids is not None else list(range(n_regions))
    return [cnn.init_variables(jax.random.fold_in(_region_key(key, r), _INIT_STREAM), model, box) for r in ids]


def _fresh_state(variables: dict, tx) -> dict:
    return {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(variables["params"]),
        "epoch": -1,
        "history": [],
        "best_params": variables["params"],
        "best_batch_stats": variables["batch_stats"],
        "best_epoch": -1,
        "best_val_loss": math.inf,
        "bad_epochs": 0,
        "stopped": False,
    }


def _restore_state(template: dict, raw: dict) -> dict:
    """Resume state from `params_from_bytes(...)` output (plain dicts) onto a fresh template."""
    state = dict(template)
    for k in ("params", "batch_stats", "opt_state", "best_params", "best_batch_stats"):
        state[k] = flax.serialization.from_state_dict(template[k], raw[k])
    state["epoch"] = int(raw["epoch"])
    state["history"] = _history_from_raw(raw.get("history", []))
    state["best_epoch"] = int(raw["best_epoch"])
    state["best_val_loss"] = float(raw["best_val_loss"])
    state["bad_epochs"] = int(raw["bad_epochs"])
    state["stopped"] = bool(raw["stopped"])
    return state


def _history_from_raw(h) -> list[dict]:
    if isinstance(h, dict):  # msgpack restores lists as {"0": …, "1": …}
        h = [h[k] for k in sorted(h, key=int)]
    return [{k: (None if v is None else (int(v) if k == "epoch" else float(v))) for k, v in e.items()} for e in h]


# --------------------------------------------------------------------------- jitted pieces


def _bce_acc(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    return optax.sigmoid_binary_cross_entropy(logits, y), ((logits > 0) == (y > 0.5)).astype(jnp.float32)


def _apply_train(model, params, batch_stats, x, key):
    logits, upd = model.apply(
        {"params": params, "batch_stats": batch_stats}, x[..., None], train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    return logits, upd.get("batch_stats", batch_stats)


def _region_batch(images, pos_idx, n_pos, neg_idx, n_neg, k, batch_size: int, max_shift_px: float):
    """A step's balanced, augmented batch and its dropout key, from the step key k."""
    k_batch, k_aug, k_drop = jax.random.split(k, 3)
    idx, y = balanced_batch(k_batch, pos_idx, n_pos, neg_idx, n_neg, batch_size)
    return augment_mod.augment(k_aug, images[idx], max_shift_px), y, k_drop


def _region_update_body(model: cnn.RegionCNN, lr: float):
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


def _region_step_body(model: cnn.RegionCNN, lr: float, batch_size: int, max_shift_px: float):
    """One Adam step of one per-region net on a balanced, augmented batch (not jitted)."""
    update = _region_update_body(model, lr)

    def step(params, batch_stats, opt_state, images, pos_idx, n_pos, neg_idx, n_neg, k):
        x, y, k_drop = _region_batch(images, pos_idx, n_pos, neg_idx, n_neg, k, batch_size, max_shift_px)
        return update(params, batch_stats, opt_state, x, y, k_drop)

    return step


# Steps whose batches the loop formulation makes in one call, bounded by _BATCH_GROUP_BYTES.
_BATCH_GROUP_STEPS = 8
_BATCH_GROUP_BYTES = 64 * 2**20


def _batch_group_steps(batch_size: int, box: int) -> int:
    return int(max(1, min(_BATCH_GROUP_STEPS, _BATCH_GROUP_BYTES // (4 * batch_size * box * box))))


def _pre_batched_epoch(update, make_batches, n_steps: int, batch_size: int, group: int | None = None, stacked: bool = False):
    """The loop formulation's epoch: the batches of `group` steps made in one jitted call (the
    same keys, so the same batches as the fused step), then one jitted update per step.

    Measured on XLA:CPU (2 cores, batch 128, ms per step, medians of 8 alternating rounds): the
    sampling + augmentation inside the jitted training step cost ~5 ms of a 32-px step (its
    gathers scheduled among the network's work) against < 0.5 ms on their own: 32 px 25.9 →
    21.3, 24 px 13.7 → 11.8, 64 px 199 → 202 (equal within noise). Step keys as in
    `_stepwise_epoch`; the last group is padded with repeated keys (their batches are unused),
    so one compiled batch maker serves every group. group: default `_batch_group_steps` of the
    images' box, at most n_steps. make_batches(*data, keys) -> (xs, ys, dropout keys), one per
    key; update(params, batch_stats, opt_state, x, y, k_drop) -> (…, loss, acc); the epoch's
    loss/acc are the means over steps (per head for the shared trunk).
    stacked: R nets at once (the vmapped formulation): key is (R,) keys, each region's step keys
    ``split(key_r, n_steps)`` as in the loop (so the same batches), make_batches(*data, ks (R, g))
    returns (g, R, …) and update is vmapped over regions; loss/acc per region. Measured on one
    H100 at 120 px (2026-11-26, batch 128): one region trained this way 4.1 ms per step, while
    the fused vmapped step (batch making inside the update) took 102 / 126 / 238 ms for 3 / 8 /
    42 regions — ~95 ms that did not scale with the regions."""

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
    """An epoch as a Python loop over a jitted step.

    Not ``lax.scan``: measured on XLA:CPU (2 cores, 64 px, batch 128) a scanned epoch ran at
    13 image-steps/s against 333 for the same step jitted alone (convolutions inside a while loop
    lose XLA:CPU's fast paths); the loop's dispatch cost (< 1 ms) is negligible next to a step.
    The step keys are ``split(key, n_steps)`` (per region when ``stacked``), so results do not
    depend on how an epoch is cut. Returns (params, batch_stats, opt_state, mean loss, mean acc)."""

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


_EPOCH_IN_AXES = (0, 0, 0, None, 0, 0, 0, 0, 0)  # vmap over regions; the image set is shared


@lru_cache(maxsize=32)
def _region_epoch_fn(model: cnn.RegionCNN, lr: float, n_steps: int, batch_size: int, max_shift_px: float):
    """One epoch of one per-region net and of R stacked nets (vmapped over regions), both with
    their batches made ahead (`_pre_batched_epoch`)."""
    batch = partial(_region_batch, batch_size=batch_size, max_shift_px=max_shift_px)
    update = _region_update_body(model, lr)
    one = _pre_batched_epoch(jax.jit(update), jax.jit(jax.vmap(batch, in_axes=(None,) * 5 + (0,))), n_steps, batch_size)
    # stacked: regions (axis 0 of the index arrays and keys) inside, steps (keys' axis 1) outside
    make_many = jax.vmap(jax.vmap(batch, in_axes=(None, 0, 0, 0, 0, 0)), in_axes=(None,) * 5 + (1,))
    many = _pre_batched_epoch(jax.jit(jax.vmap(update)), jax.jit(make_many), n_steps, batch_size, stacked=True)
    return one, many


@lru_cache(maxsize=32)
def _region_epoch_sharded_fn(model: cnn.RegionCNN, lr: float, n_steps: int, batch_size: int, max_shift_px: float, mesh):
    """The vmapped epoch with the region axis split over ``mesh`` ("regions"): every device runs
    the vmapped step on its slice of regions (``shard_map``); the images are replicated."""
    step = jax.vmap(_region_step_body(model, lr, batch_size, max_shift_px), in_axes=_EPOCH_IN_AXES)
    ax, rep = devices.P(devices.REGION_AXIS), devices.P()
    return _stepwise_epoch(jax.jit(devices.shard_map(step, mesh, in_specs=(ax, ax, ax, rep, ax, ax, ax, ax, ax), out_specs=ax)),
                           n_steps, stacked=True)


@lru_cache(maxsize=32)
def _shared_epoch_fn(model: cnn.RegionCNN, lr: float, n_steps: int, batch_size: int, max_shift_px: float, loss_kind: str = "one_vs_rest"):
    """One epoch of the shared-trunk net: batches stratified over labels, made ahead in groups of
    steps as for the per-region nets (`_pre_batched_epoch`), then one jitted update per step.

    loss_kind "one_vs_rest": mean over heads of the balanced BCE; "softmax": mean softmax cross-entropy
    over the heads (every sampled label must have a head). Returns per-head (H,) train loss/acc."""
    polar_input = isinstance(model, polar.PolarCNN)
    make = jax.vmap(partial(_shared_batch, batch_size=batch_size, max_shift_px=max_shift_px, polar_input=polar_input), in_axes=(None,) * 5 + (0,))
    return _pre_batched_epoch(jax.jit(_shared_update_body(model, lr, loss_kind)), jax.jit(make), n_steps, batch_size)


def _shared_batch(images, members, counts, img_labels, head_regions, k, batch_size: int, max_shift_px: float,
                  polar_input: bool = False):
    """A shared-trunk step's batch (labels drawn uniformly, then a member of each), its (B, H)
    targets and dropout key, from the step key k. polar_input: the images augmented and sampled
    on the polar trunk's grid in one interpolation (`polar.polar_augment`)."""
    n_labels = members.shape[0]
    k_lab, k_img, k_aug, k_drop = jax.random.split(k, 4)
    lab = jax.random.randint(k_lab, (batch_size,), 0, n_labels)
    idx = members[lab, jax.random.randint(k_img, (batch_size,), 0, counts[lab])]
    y = (img_labels[idx][:, None] == head_regions[None, :]).astype(jnp.float32)
    if polar_input:
        return polar.polar_augment(k_aug, images[idx], max_shift_px), y, k_drop
    return augment_mod.augment(k_aug, images[idx], max_shift_px), y, k_drop


def _shared_update_body(model: cnn.RegionCNN, lr: float, loss_kind: str):
    """One Adam step of the shared-trunk net on a given batch (not jitted)."""
    tx = optax.adam(lr)

    def update(params, batch_stats, opt_state, x, y, k_drop):
        def loss_fn(p):
            logits, new_bs = _apply_train(model, p, batch_stats, x, k_drop)
            if loss_kind == "softmax":
                total, head_loss, acc = _softmax_per_head(logits, y)
                return total, (new_bs, head_loss, acc)
            head_loss, acc = _balanced_per_head(logits, y)
            return head_loss.mean(), (new_bs, head_loss, acc)

        (_, (new_bs, loss, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_bs, opt_state, loss, acc

    return update


def _softmax_per_head(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax cross-entropy over the heads with one-hot targets, and per-head metrics.

    logits, y: (B, H), every row of y one-hot.  Returns (mean CE (), per-head CE (H,): mean over
    the images of that head's class (the batch mean where the class is absent), per-head balanced
    accuracy (H,) of the decision "argmax == head")."""
    ce = optax.softmax_cross_entropy(logits, y)
    n_pos = y.sum(0)
    head_ce = jnp.where(n_pos > 0, (y * ce[:, None]).sum(0) / jnp.maximum(n_pos, 1), ce.mean())
    pred = jax.nn.one_hot(jnp.argmax(logits, axis=1), logits.shape[1])
    _, acc = _balanced_per_head(jnp.where(pred > 0, 1.0, -1.0), y)
    return ce.mean(), head_ce, acc


def _softmax_val(logits: np.ndarray, y_val: np.ndarray, regions: Sequence[int]) -> list[tuple[float | None, float | None]]:
    """Per head (in `regions` order): validation CE over the images of that region and balanced
    accuracy of "argmax == head"; images whose label has no head are ignored. (None, None) when
    there are no usable validation images; a head without validation images gets CE None."""
    keep = np.isin(y_val, np.asarray(regions))
    if not keep.any():
        return [(None, None)] * len(regions)
    y = (y_val[keep][:, None] == np.asarray(regions)[None, :]).astype(np.float32)
    _, _, acc = _softmax_per_head(jnp.asarray(logits[keep]), jnp.asarray(y))
    ce = np.asarray(optax.softmax_cross_entropy(jnp.asarray(logits[keep]), jnp.asarray(y)))
    n_pos = y.sum(0)
    return [(float((y[:, j] * ce).sum() / n_pos[j]) if n_pos[j] > 0 else None, float(acc[j])) for j in range(len(regions))]


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


@lru_cache(maxsize=32)
def _logits_fn(model: cnn.RegionCNN):
    """Jitted eval-mode forward: (variables, images (B, N, N)) -> (B, n_heads) logits."""
    return jax.jit(lambda variables, x: model.apply(variables, x[..., None], train=False))


_SHARED_FIRST_BYTES = 256 * 2**20  # bound on one group's first-block activations (predict)


@lru_cache(maxsize=32)
def _shared_first_fns(model: cnn.RegionCNN):
    fold = jax.jit(lambda p, s: cnn.fold_batch_norm(p, s, 0))
    first = jax.jit(partial(cnn.shared_first_block, impl=model.conv_impls[0]))
    tail = jax.jit(lambda p, s, h, j: cnn.tail_eval(model, p, s, lax.dynamic_index_in_dim(h, j, keepdims=False))[:, 0])
    return fold, first, tail


def _predict_shared_first(model: cnn.RegionCNN, variables: list, images, batch_size: int, max_bytes: float) -> np.ndarray:
    """Logits (n, R) of R per-region batch-norm nets, their first layer shared.

    Per chunk of images, the first block of G nets at a time runs as one convolution with G·16
    outputs (`cnn.shared_first_block`; G bounded by `max_bytes` of activations), then
    each net's remaining layers (`cnn.tail_eval`, one jitted call per net). Measured on the 2-core
    CPU (10 nets, batch 512, particle·region/s, the per-net loop → this, two runs): 24 px
    18,200–20,300 → 24,500, 32 px 9,400–9,500 → 12,800–13,000; 42 nets: 24 px 21,400 → 25,500,
    32 px 7,500 → 11,200 (13,000 with 1 GiB groups; direct first layer); with an FFT
    first layer it loses (64 px 1,660–1,690 → 1,420–1,470, 120 px 270–280 → 245–255: the shared
    part is only the input transform, and the G·16-channel output is transposed per net), so
    "auto" keeps the loop there. Equal to the per-net forward to float32 rounding (batch norm
    folded)."""
    n, box = images.shape[0], images.shape[1]
    n_nets = len(variables)
    fold, first, tail = _shared_first_fns(model)
    per_net = batch_size * model.conv_filters[0] * box**2 * 4  # the first conv's output, before the pool
    n_groups = -(-n_nets // max(1, min(n_nets, int(max_bytes // per_net))))
    g = -(-n_nets // n_groups)  # equal groups: at most n_groups - 1 padded nets
    folded = [fold(v["params"], v["batch_stats"]) for v in variables]
    groups = []
    for s0 in range(0, n_nets, g):
        members = list(range(s0, min(s0 + g, n_nets)))
        padded = members + [members[0]] * (g - len(members))  # one compiled shape for every group
        groups.append((members, jnp.stack([folded[i][0] for i in padded]), jnp.stack([folded[i][1] for i in padded])))
    out = np.zeros((n, n_nets), np.float32)
    for start, m, x in _padded_batches(images, batch_size):
        cols = []
        for members, kernels, biases in groups:
            h = first(x, kernels, biases)
            cols += [tail(variables[i]["params"], variables[i]["batch_stats"], h, j) for j, i in enumerate(members)]
        out[start : start + m] = np.stack([np.asarray(c) for c in cols], axis=1)[:m]
    return out


@lru_cache(maxsize=32)
def _fft_eval_fns(model: cnn.RegionCNN, box: int):
    """(prepare, forward) of R stacked batch-norm FFT nets with their kernel spectra computed once
    (`cnn.fft_eval_prepare`, jitted, vmapped over the nets) instead of in every batch's program:
    prepare(R-stacked variables) -> prepared; forward(prepared, (B, N, N)) -> (B, R)."""
    prep = jax.vmap(lambda v: cnn.fft_eval_prepare(model, v["params"], v["batch_stats"], box))
    f = jax.vmap(lambda p, x: cnn.fft_eval_apply(model, p, x[..., None])[:, 0], in_axes=(0, None))
    return jax.jit(prep), jax.jit(lambda p, x: f(p, x).T)


@lru_cache(maxsize=32)
def _logits_stacked_fn(model: cnn.RegionCNN):
    """Jitted eval forward of R stacked per-region nets: (R-stacked variables, (B, N, N)) -> (B, R)."""
    f = jax.vmap(lambda v, x: model.apply(v, x[..., None], train=False)[:, 0], in_axes=(0, None))
    return jax.jit(lambda variables, x: f(variables, x).T)


@lru_cache(maxsize=32)
def _logits_shared_vmap_fn(model: cnn.RegionCNN, first_impl: str = "direct", compute_dtype: str | None = None):
    """Jitted eval forward of R stacked batch-norm nets with their first layer shared, in ONE
    program: (R-stacked variables, (B, N, N)) -> (B, R).

    The first block of all R nets runs as one convolution with R·C1 outputs on the shared images
    (`cnn.shared_first_block`, batch norm folded; `first_impl` "direct" or "fft", the direct one
    optionally in `compute_dtype`, e.g. "bfloat16"), an ordinary convolution rather than the
    grouped one that vmapping the first layer makes; the remaining layers (`cnn.tail_eval`, the
    model's own conv implementations) are vmapped over the nets."""
    dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)

    def f(stacked, x):
        p, s = stacked["params"], stacked["batch_stats"]
        kernels, biases = jax.vmap(lambda pi, si: cnn.fold_batch_norm(pi, si, 0))(p, s)
        h = cnn.shared_first_block(x, kernels, biases, first_impl, dtype)
        return jax.vmap(lambda pi, si, hi: cnn.tail_eval(model, pi, si, hi)[:, 0])(p, s, h).T

    return jax.jit(f)


@lru_cache(maxsize=32)
def _logits_stacked_sharded_fn(model: cnn.RegionCNN, mesh):
    """:func:`_logits_stacked_fn` with the stacked region axis split over ``mesh`` ("regions"):
    (R-stacked variables sharded, (B, N, N)) -> (B, R), the images replicated to every device."""
    f = jax.vmap(lambda v, x: model.apply(v, x[..., None], train=False)[:, 0], in_axes=(0, None))
    ax = devices.REGION_AXIS
    g = jax.jit(devices.shard_map(lambda v, x: f(v, x).T, mesh, in_specs=(devices.P(ax), devices.P()), out_specs=devices.P(None, ax)))
    return lambda variables, x: g(variables, devices.replicate(x, mesh))


def stack_region_variables(variables: Sequence[dict], mesh=None) -> Any:
    """Stack per-region variable trees along a new leading region axis.

    mesh None: plain ``jnp.stack``. With a "regions" mesh (:func:`devices.region_mesh`) the region
    axis is padded to a multiple of the device count (repeating the first region; callers drop
    the padded outputs) and split over the devices."""
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *variables)
    if mesh is None:
        return stacked
    n_pad = devices.pad_to_multiple(len(variables), devices.mesh_size(mesh))
    return devices.shard_leading(devices.pad_leading(stacked, n_pad), mesh, devices.REGION_AXIS)


def _padded_batches(images, batch_size: int):
    """(start, m, (batch_size, N, N) float32 device array) over `images` (n, N, N) — numpy or memmap,
    read one batch at a time — with the last batch zero-padded, so one compiled shape serves all."""
    for start in range(0, images.shape[0], batch_size):
        chunk = np.asarray(images[start : start + batch_size], np.float32)
        m = chunk.shape[0]
        if m < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], np.float32)])
        yield start, m, jnp.asarray(chunk)


def _chunked_logits(fn, variables, images, batch_size: int) -> np.ndarray:
    """Apply a jitted forward over `images` (n, N, N) in fixed-size chunks (last chunk padded).

    One chunk stays in flight: the next chunk is read and dispatched before the previous result is
    copied back, so reading, transfers and the device's work overlap (JAX dispatches asynchronously)."""
    out, pending = [], None
    for _, m, x in _padded_batches(images, batch_size):
        y = fn(variables, x)
        if pending is not None:
            out.append(np.asarray(pending[1])[: pending[0]])
        pending = (m, y)
    if pending is not None:
        out.append(np.asarray(pending[1])[: pending[0]])
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


# --------------------------------------------------------------------------- training driver


def _use_vmap(cfg: Any) -> bool:
    """Training formulation: "auto" vmaps the regions only off CPU over several devices (the
    region axis split over them); on one device, CPU or GPU, the loop was measured faster."""
    if cfg.region_parallel == "auto":
        return jax.default_backend() != "cpu" and devices.region_mesh() is not None
    return cfg.region_parallel == "vmap"


def _record_epoch(state: dict, epoch: int, train_loss, train_acc, val_loss, val_acc, patience: int) -> None:
    """Append metrics, keep the best variables by validation (or, without one, training) loss."""
    state["epoch"] = epoch
    state["history"].append(
        {
            "epoch": epoch,
            "train_loss": float(train_loss),
            "train_acc": float(train_acc),
            "val_loss": None if val_loss is None else float(val_loss),
            "val_acc": None if val_acc is None else float(val_acc),
        }
    )
    monitor = float(train_loss) if val_loss is None else float(val_loss)
    if monitor < state["best_val_loss"]:
        state.update(
            best_val_loss=monitor,
            best_epoch=epoch,
            best_params=state["params"],
            best_batch_stats=state["batch_stats"],
            bad_epochs=0,
        )
    else:
        state["bad_epochs"] += 1
        if patience > 0 and state["bad_epochs"] >= patience:
            state["stopped"] = True


def _balanced_val(logits: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """Balanced loss/accuracy of one head on the validation set (None when it is empty)."""
    if y.size == 0:
        return None, None
    loss, acc = _balanced_per_head(jnp.asarray(logits[:, None]), jnp.asarray(y[:, None]))
    return float(loss[0]), float(acc[0])


def train_regions(
    images,
    labels,
    region_ids: Sequence[int],
    cfg: Any,
    key: jax.Array,
    progress: Callable[[dict], None] | None = None,
    resume_state: dict | None = None,
    checkpoint_cb: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Train the classifiers of `region_ids` together.

    images: (n, N, N) float32, normalised (numpy or memmap).  labels: (n,) int region of every
    image (all regions, not only the selected ones: the others are negatives).  cfg: TrainConfig.
    key: jax PRNG key (e.g. ``jax.random.key(cfg.seed)``).
    progress: called with {"event": "epoch", "region", "epoch", "epochs", "train_loss", "train_acc",
      "val_loss", "val_acc", "images" (augmented images trained on), "seconds" (wall time of that
      region-epoch incl. validation), "stopped"} after every region-epoch and with
      {"event": "skipped", "region", "warning"} for skipped regions.
    resume_state: {region: state} as passed to checkpoint_cb, possibly round-tripped through
      ``params_to_bytes`` / ``params_from_bytes`` (plain dicts are fine); training continues after
      its last epoch. For the shared trunk the key is SHARED_REGION.
    checkpoint_cb: called (region, epoch, state) after every epoch; state holds the current and best
      variables, the optimiser state and the history.
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
    box = images.shape[1]
    region_ids = sorted(int(r) for r in region_ids)
    train_idx, val_idx = split_train_val(key, labels, cfg.validation_fraction)
    train_images = jnp.asarray(np.asarray(images[train_idx], np.float32))
    val_images = np.asarray(images[val_idx], np.float32)
    y_train, y_val = labels[train_idx], labels[val_idx]

    results: dict[int, dict] = {}
    active = []
    for r in region_ids:
        n_pos = int((y_train == r).sum())
        n_neg = int(y_train.size - n_pos)
        if n_pos < max(1, cfg.min_positives) or n_neg == 0:
            why = f"{n_pos} training particles" if n_neg else "no particles of other regions"
            warning = f"region {r}: {why} (min_positives = {cfg.min_positives}); skipped"
            results[r] = {"params": None, "batch_stats": None, "history": [], "best_epoch": -1, "arch": None, "head": None, "warning": warning}
            if progress:
                progress({"event": "skipped", "region": r, "warning": warning})
        else:
            active.append(r)
    if not active:
        return results
    if is_shared(cfg):
        results.update(_train_shared(train_images, y_train, val_images, y_val, active, cfg, key, box, progress, resume_state, checkpoint_cb))
    else:
        results.update(_train_per_region(train_images, y_train, val_images, y_val, active, cfg, key, box, progress, resume_state, checkpoint_cb))
    return results


def _train_per_region(train_images, y_train, val_images, y_val, regions, cfg, key, box, progress, resume_state, checkpoint_cb):
    arch = cnn.architecture(cfg, box, 1)
    model = cnn.build_model(arch, cfg.conv_impl)
    tx = optax.adam(cfg.learning_rate)
    n_steps = math.ceil(cfg.images_per_region / cfg.batch_size)
    max_shift_px = float(cfg.max_shift_frac * box)
    epoch_one, epoch_many = _region_epoch_fn(model, float(cfg.learning_rate), n_steps, cfg.batch_size, max_shift_px)
    logits_fn = _logits_fn(model)
    n_train = y_train.size

    inits = init_region_params(key, cfg, box, len(regions), regions)
    states, data = {}, {}
    for r, variables in zip(regions, inits):
        state = _fresh_state(variables, tx)
        if resume_state and r in resume_state:
            state = _restore_state(state, resume_state[r])
        states[r] = state
        pos, neg = np.flatnonzero(y_train == r), np.flatnonzero(y_train != r)
        data[r] = (jnp.asarray(_padded(pos, n_train)), jnp.int32(pos.size), jnp.asarray(_padded(neg, n_train)), jnp.int32(neg.size))

    use_vmap = _use_vmap(cfg)
    mesh = devices.region_mesh() if use_vmap else None  # None on one device: unchanged path
    if mesh is not None:
        epoch_sharded = _region_epoch_sharded_fn(model, float(cfg.learning_rate), n_steps, cfg.batch_size, max_shift_px, mesh)
        images_rep = devices.replicate(train_images, mesh)
    start = min(states[r]["epoch"] for r in regions) + 1
    for epoch in range(start, cfg.epochs):
        todo = [r for r in regions if not states[r]["stopped"] and states[r]["epoch"] < epoch]
        if not todo:
            break
        outs = {}
        groups = vmap_region_groups(todo, cfg.batch_size, box, model.conv_filters[0], devices.memory_bytes(),
                                    devices.mesh_size(mesh)) if use_vmap else []
        for group in groups:  # regions whose stacked nets fit the device(s) together
            if mesh is None:
                stack = lambda name: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[states[r][name] for r in group])
                args = [jnp.stack([data[r][i] for r in group]) for i in range(4)]
                keys = jnp.stack([_epoch_key(key, r, epoch) for r in group])
                out = epoch_many(stack("params"), stack("batch_stats"), stack("opt_state"), train_images, *args, keys)
            else:  # several devices: region axis padded to a multiple of them and split
                padded = group + [group[0]] * (devices.pad_to_multiple(len(group), devices.mesh_size(mesh)) - len(group))
                shard = lambda t: devices.shard_leading(t, mesh, devices.REGION_AXIS)
                stack = lambda name: shard(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[states[r][name] for r in padded]))
                args = [shard(jnp.stack([data[r][i] for r in padded])) for i in range(4)]
                keys = shard(jnp.stack([_epoch_key(key, r, epoch) for r in padded]))
                out = epoch_sharded(stack("params"), stack("batch_stats"), stack("opt_state"), images_rep, *args, keys)
                # gathered to the host and back onto the default device, uncommitted like the
                # single-device results (per-region arrays of different devices could not be stacked)
                out = jax.tree_util.tree_map(jnp.asarray, jax.device_get(out))
            outs.update({r: jax.tree_util.tree_map(lambda a, i=i: a[i], out) for i, r in enumerate(group)})
        for r in todo:
            t0 = time.perf_counter()
            if use_vmap:
                params, bstats, opt_state, tl, ta = outs[r]
            else:
                params, bstats, opt_state, tl, ta = epoch_one(
                    states[r]["params"], states[r]["batch_stats"], states[r]["opt_state"], train_images, *data[r], _epoch_key(key, r, epoch)
                )
                tl = float(tl)  # waits for the epoch, so "seconds" below is its duration
            state = states[r]
            state.update(params=params, batch_stats=bstats, opt_state=opt_state)
            val_logits = _chunked_logits(logits_fn, {"params": params, "batch_stats": bstats}, val_images, _EVAL_CHUNK)
            vl, va = _balanced_val(val_logits[:, 0] if val_logits.size else val_logits.reshape(0), (y_val == r).astype(np.float32))
            _record_epoch(state, epoch, tl, ta, vl, va, cfg.early_stopping_patience)
            if checkpoint_cb:
                checkpoint_cb(r, epoch, state)
            if progress:
                progress({"event": "epoch", "region": r, "epoch": epoch, "epochs": cfg.epochs, **state["history"][-1],
                          "images": n_steps * cfg.batch_size, "seconds": time.perf_counter() - t0, "stopped": state["stopped"]})
    return {
        r: {"params": s["best_params"], "batch_stats": s["best_batch_stats"], "history": s["history"], "best_epoch": s["best_epoch"],
            "arch": arch, "head": 0, "warning": None}
        for r, s in states.items()
    }


def _train_shared(train_images, y_train, val_images, y_val, regions, cfg, key, box, progress, resume_state, checkpoint_cb):
    softmax = getattr(cfg, "shared_loss", "one_vs_rest") == "softmax"
    arch = model_architecture(cfg, box, len(regions))
    if softmax:
        arch["shared_loss"] = "softmax"
    model = cnn.build_model(arch, cfg.conv_impl)
    tx = optax.adam(cfg.learning_rate)
    present = np.unique(y_train)
    n_steps = math.ceil(cfg.images_per_region * present.size / (2 * cfg.batch_size))
    if softmax:  # only labels with a head can be softmax targets
        present = np.intersect1d(present, np.asarray(regions))
    epoch_fn = _shared_epoch_fn(model, float(cfg.learning_rate), n_steps, cfg.batch_size, float(cfg.max_shift_frac * box),
                                "softmax" if softmax else "one_vs_rest")
    logits_fn = _logits_fn(model)
    groups = [np.flatnonzero(y_train == lab) for lab in present]
    members = np.stack([_padded(g, max(x.size for x in groups)) for g in groups])
    counts = np.array([g.size for g in groups], np.int32)
    heads = jnp.asarray(np.array(regions, np.int32))

    state = _fresh_state(init_region_params(key, cfg, box, len(regions))[0], tx)
    if resume_state and SHARED_REGION in resume_state:
        state = _restore_state(state, resume_state[SHARED_REGION])
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        if state["stopped"]:
            break
        t0 = time.perf_counter()
        params, bstats, opt_state, tl, ta = epoch_fn(
            state["params"], state["batch_stats"], state["opt_state"], train_images, jnp.asarray(members), jnp.asarray(counts),
            jnp.asarray(y_train.astype(np.int32)), heads, _epoch_key(key, SHARED_REGION, epoch),
        )
        state.update(params=params, batch_stats=bstats, opt_state=opt_state)
        val_logits = _chunked_logits(logits_fn, {"params": params, "batch_stats": bstats}, val_images, _EVAL_CHUNK)
        if softmax:
            per_head = _softmax_val(val_logits, y_val, regions)
            losses = [p[0] for p in per_head if p[0] is not None]
            vl = float(np.mean(losses)) if losses else None
            va = None if per_head[0][1] is None else float(np.mean([p[1] for p in per_head]))
        else:
            per_head = [_balanced_val(val_logits[:, j] if val_logits.size else np.zeros(0), (y_val == r).astype(np.float32)) for j, r in enumerate(regions)]
            vl = None if per_head[0][0] is None else float(np.mean([p[0] for p in per_head]))
            va = None if per_head[0][1] is None else float(np.mean([p[1] for p in per_head]))
        _record_epoch(state, epoch, np.mean(tl), np.mean(ta), vl, va, cfg.early_stopping_patience)
        state.setdefault("head_history", {})
        for j, r in enumerate(regions):
            state["head_history"].setdefault(r, []).append(
                {"epoch": epoch, "train_loss": float(tl[j]), "train_acc": float(ta[j]), "val_loss": per_head[j][0], "val_acc": per_head[j][1]}
            )
        if checkpoint_cb:
            checkpoint_cb(SHARED_REGION, epoch, {k: v for k, v in state.items() if k != "head_history"})
        if progress:
            progress({"event": "epoch", "region": SHARED_REGION, "epoch": epoch, "epochs": cfg.epochs, **state["history"][-1],
                      "images": n_steps * cfg.batch_size, "seconds": time.perf_counter() - t0, "stopped": state["stopped"]})
    head_history = state.get("head_history", {})
    return {
        r: {"params": state["best_params"], "batch_stats": state["best_batch_stats"], "history": head_history.get(r, []),
            "best_epoch": state["best_epoch"], "arch": arch, "head": j, "warning": None}
        for j, r in enumerate(regions)
    }


# --------------------------------------------------------------------------- prediction


def predict_probs(models: dict, images, batch_size: int, region_parallel: str = "auto",
                  memory_budget_gb: float | None = None) -> np.ndarray:
    """Probability that each image belongs to each trained region.

    models: {region: entry} as returned by `train_regions` (or restored checkpoints); entries
    without params (skipped) are ignored.  images: (n, N, N) float32 (numpy or memmap; read in
    chunks of batch_size).  region_parallel: "shared" (batch-norm nets: the first layer of all
    nets as one convolution on the shared images, then each net's rest, see
    `_predict_shared_first`; fastest on CPU), "loop" (one jitted net after another per chunk),
    "vmap" (all nets stacked, one call per chunk; with several devices the stacked region axis
    is split over them, see the module docstring), "vmap_pre" (one device, batch-norm nets:
    as "vmap" with FFT convolutions whose kernel spectra are computed once, `_fft_eval_fns`) or
    "auto" (on CPU "shared" for batch-norm nets whose first layer is a direct convolution, else
    "loop"; "vmap" on accelerators). With
    "shared_vmap[:IMPL[+DTYPE]]" (batch-norm nets: the first layer of all nets as one IMPL
    ("direct", the default, or "fft") convolution, in DTYPE (e.g. bfloat16) if given, the other
    layers vmapped, all in one jitted program, see `_logits_shared_vmap_fn`; with several devices
    it runs as "vmap"). With
    the space-to-depth first layer (`cnn.conv2d_s2d`, CPU "auto" for first kernels of 5–16 px)
    the loop is faster than the shared first layer (2,048 images × 42 random nets, 2-core CPU,
    particle·region/s, loop vs shared: 24 px 43k vs 26k, 32 px 20k vs 12.4k, 40 px 9.2k vs
    6.1k, 48 px 6.5k vs 3.9k; the previous defaults were 26k, 12.4k, 4.4k (FFT loop), 5.6k).
    memory_budget_gb: the shared path's first-layer activations are kept to 1/16 of it (default
    ``_SHARED_FIRST_BYTES``, 256 MiB = 1/16 of predict's default 4 GB).
    Returns (n, R) float32, columns in sorted region order of the trained entries: sigmoid of
    each head, or for a shared trunk trained with shared_loss="softmax" the softmax over its heads."""
    regions = sorted(r for r, m in models.items() if m.get("params") is not None)
    if not regions:
        raise DeepAlignError("predict: no trained region models")
    n = images.shape[0]
    out = np.zeros((n, len(regions)), np.float32)
    first = models[regions[0]]
    if first["arch"]["n_heads"] > 1 or first["arch"].get("model") == "polar_trunk":  # one net: one forward, pick the heads
        model = cnn.build_model(first["arch"], "auto")
        logits = _chunked_logits(_logits_fn(model), {"params": first["params"], "batch_stats": first["batch_stats"]}, images, batch_size)
        heads = [int(models[r]["head"]) for r in regions]
        if first["arch"].get("shared_loss") == "softmax":  # softmax over all heads, then pick
            return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=1))[:, heads].astype(np.float32)
        out[:] = logits[:, heads]
        return np.asarray(jax.nn.sigmoid(out))
    model = cnn.build_model(first["arch"], "auto")
    use_vmap = (jax.default_backend() != "cpu") if region_parallel == "auto" else region_parallel in ("vmap", "vmap_pre")
    variables = [{"params": models[r]["params"], "batch_stats": models[r]["batch_stats"]} for r in regions]
    shared = region_parallel == "shared" or (region_parallel == "auto" and not use_vmap and model.norm == "batch"
                                              and model.conv_impls[0] == "direct")
    if shared:
        if model.norm != "batch":
            raise DeepAlignError(f"predict: region_parallel 'shared' needs batch-norm nets, these use {model.norm!r}")
        max_bytes = _SHARED_FIRST_BYTES if memory_budget_gb is None else memory_budget_gb * 2**30 / 16
        out[:] = _predict_shared_first(model, variables, images, batch_size, max_bytes)
        return np.asarray(jax.nn.sigmoid(out))
    shared_vmap = region_parallel.startswith("shared_vmap")
    use_vmap = use_vmap or shared_vmap
    mesh = devices.region_mesh() if use_vmap else None
    if use_vmap:  # chunks small enough for the device: every image meets all (this device's) nets at once
        per_device = -(-len(regions) // devices.mesh_size(mesh))
        batch_size = vmap_chunk_size(batch_size, images.shape[-1], model.conv_filters[0], per_device, devices.memory_bytes())
    if shared_vmap and mesh is None:
        if model.norm != "batch":
            raise DeepAlignError(f"predict: region_parallel {region_parallel!r} needs batch-norm nets, these use {model.norm!r}")
        _, _, spec = region_parallel.partition(":")  # "shared_vmap[:first_impl[+dtype]]"
        first_impl, _, dtype = (spec or "direct").partition("+")
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *variables)
        out[:] = _chunked_logits(_logits_shared_vmap_fn(model, first_impl, dtype or None), stacked, images, batch_size)
    elif use_vmap and mesh is None and region_parallel == "vmap_pre":
        if model.norm != "batch":
            raise DeepAlignError(f"predict: region_parallel 'vmap_pre' needs batch-norm nets, these use {model.norm!r}")
        prepare, forward = _fft_eval_fns(model.clone(conv_impls=("fft",) * len(model.conv_impls)), images.shape[-1])
        prepared = prepare(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *variables))
        out[:] = _chunked_logits(forward, prepared, images, batch_size)
    elif use_vmap and mesh is None:
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *variables)
        out[:] = _chunked_logits(_logits_stacked_fn(model), stacked, images, batch_size)
    elif use_vmap:  # several devices: the stacked (padded) region axis split over them
        stacked = stack_region_variables(variables, mesh)
        out[:] = _chunked_logits(_logits_stacked_sharded_fn(model, mesh), stacked, images, batch_size)[:, : len(regions)]
    else:
        fn = _logits_fn(model)
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size]
            for j, v in enumerate(variables):
                out[start : start + chunk.shape[0], j] = _chunked_logits(fn, v, chunk, batch_size)[:, 0]
    return np.asarray(jax.nn.sigmoid(out))


# Device bytes of the vmapped forward pass per image, per stacked net, per pixel of the box and per
# channel of the first layer. Measured 2026-11-26 on one H100 (120 px, FFT nets, 42 regions, JAX's
# 60 GiB pool): a chunk of 1,024 images asked for 100.5 GiB (≈ 11 B) and 512 images for a 25 GiB
# cuFFT work area (≈ 5.5 B) on top: 256 ran, 512 and 1,024 ran out of memory. 32 B is ~2× that.
_VMAP_BYTES_PER_PX_CHANNEL = 32
_VMAP_DEVICE_FRACTION = 0.8


def vmap_region_groups(regions: Sequence[int], batch_size: int, box: int, first_channels: int, device_bytes: int | None,
                       n_devices: int = 1) -> list[list[int]]:
    """The regions cut into as few groups of near-equal size as keep each group's stacked training
    step (batch_size images per region) within `_VMAP_DEVICE_FRACTION` of each device's memory, at
    `_VMAP_BYTES_PER_PX_CHANNEL` (XLA:CPU's buffer assignment of this step needs 16.8 B at 120 px,
    cuFFT's work area ~5.5 B more). One group where the backend reports no limit; 42 regions at
    120 px on an H100 (measured to run together) stay one group."""
    regions = list(regions)
    if not device_bytes or not regions:
        return [regions] if regions else []
    per_region = batch_size * box * box * first_channels * _VMAP_BYTES_PER_PX_CHANNEL
    fit = max(1, int(_VMAP_DEVICE_FRACTION * device_bytes // per_region)) * max(1, n_devices)
    n_groups = math.ceil(len(regions) / fit)
    size = math.ceil(len(regions) / n_groups)
    return [regions[i : i + size] for i in range(0, len(regions), size)]


def vmap_chunk_size(batch_size: int, box: int, first_channels: int, n_nets: int, device_bytes: int | None) -> int:
    """Images per call of the stacked (vmapped) nets: `batch_size`, lowered so that n_nets nets'
    activations fit `_VMAP_DEVICE_FRACTION` of the device's memory (unchanged where the backend
    reports none). 120 px, 42 nets, H100: 166 (measured particle·region/s at 128 / 256 images:
    86.9k / 94.7k; the default batch of 512 ran out of memory)."""
    if not device_bytes:
        return batch_size
    per_image = n_nets * box * box * first_channels * _VMAP_BYTES_PER_PX_CHANNEL
    return int(max(1, min(batch_size, _VMAP_DEVICE_FRACTION * device_bytes // per_image)))


def top_k_regions(probs: np.ndarray, k: int | None = None, cumulative_p: float | None = None) -> list[np.ndarray]:
    """Per particle, the column indices of its most probable regions, most probable first.

    probs: (n, R).  Exactly one rule: k → the k largest; cumulative_p → regions in descending
    order until their share of the particle's total probability reaches p (at least one).
    Returns a list of n int arrays (length k, or variable for the cumulative rule)."""
    if (k is None) == (cumulative_p is None):
        raise DeepAlignError("top-k: give either k or cumulative_p")
    order, share = coverage.ranked_shares(probs)
    if k is not None:
        return list(order[:, : min(int(k), order.shape[1])])
    n_keep = coverage.kept_counts(share, cumulative_p)
    return [order[i, : n_keep[i]] for i in range(order.shape[0])]


# --------------------------------------------------------------------------- serialisation


def params_to_bytes(model_state: dict) -> bytes:
    """msgpack bytes of a region entry or training state (arrays, numbers, strings, None, lists).

    Self-contained: an entry from `train_regions` carries its "arch", so `params_from_bytes(b)`
    alone rebuilds the network."""
    return flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(_plain(model_state)))


def params_from_bytes(data: bytes, template: Any | None = None) -> Any:
    """Inverse of `params_to_bytes`. Without template: nested dicts of numpy arrays (lists come
    back as lists); with one: the template's structure (e.g. an optax state) filled in."""
    raw = flax.serialization.msgpack_restore(data)
    if template is None:
        return _unplain(raw)
    return flax.serialization.from_state_dict(_plain(template), raw)


_LIST_TAG = "__list__"


def _plain(x):
    """Lists → tagged dicts (msgpack keeps dict keys, flax turns lists into index dicts)."""
    if isinstance(x, list):
        return {_LIST_TAG: {str(i): _plain(v) for i, v in enumerate(x)}}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


def _unplain(x):
    if isinstance(x, dict):
        if set(x) == {_LIST_TAG}:
            items = x[_LIST_TAG]
            return [_unplain(items[k]) for k in sorted(items, key=int)]
        return {k: _unplain(v) for k, v in x.items()}
    return x
