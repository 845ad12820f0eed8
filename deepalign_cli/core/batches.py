"""Training batches of the region classifiers, made on the device from a step key: balanced
batches of one region's net (the paper's recipe) and label-stratified batches of a one-net model,
each augmented, with new synthetic examples when a `synthetic.Generator` is given. Pure and
traceable: `training` jits them (vmapped over steps, and over regions for stacked nets)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import augment as augment_mod
from . import polar, synthetic


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


def region_batch(images, pos_idx, n_pos, neg_idx, n_neg, gen, region, k, batch_size: int, max_shift_px: float, n_synthetic: int = 0):
    """A step's balanced, augmented batch and its dropout key, from the step key k. With
    n_synthetic > 0, that many of the batch's images are new synthetic particles of which half
    look from within the cap of the net's region (`synthetic.generate`; unaugmented: their
    poses and shifts are already random), target 1 where their direction is in the region."""
    k_batch, k_aug, k_drop = jax.random.split(k, 3)
    idx, y = balanced_batch(k_batch, pos_idx, n_pos, neg_idx, n_neg, batch_size - n_synthetic)
    x = augment_mod.augment(k_aug, images[idx], max_shift_px)
    if n_synthetic:
        syn, syn_lab, _ = synthetic.generate(jax.random.fold_in(k, 1), gen, n_synthetic, region)
        x, y = jnp.concatenate([x, syn]), jnp.concatenate([y, (syn_lab == region).astype(jnp.float32)])
    return x, y, k_drop


def trunk_batch(images, members, counts, img_labels, head_regions, gen, k, batch_size: int, max_shift_px: float, n_synthetic: int = 0):
    """A trunk step's batch (labels drawn uniformly, then a member of each), augmented and sampled
    on the polar grid in one interpolation (`polar.polar_augment`), its (B, H) targets and dropout
    key, from the step key k. With n_synthetic > 0, that many of the batch's images are new
    synthetic particles (`synthetic.generate` with `gen`; their poses and shifts are already random,
    so they are sampled on the polar grid unaugmented)."""
    n_labels = members.shape[0]
    n_real = batch_size - n_synthetic
    k_lab, k_img, k_aug, k_drop = jax.random.split(k, 4)
    lab = jax.random.randint(k_lab, (n_real,), 0, n_labels)
    idx = members[lab, jax.random.randint(k_img, (n_real,), 0, counts[lab])]
    x, y_lab = polar.polar_augment(k_aug, images[idx], max_shift_px), img_labels[idx]
    if n_synthetic:
        syn, syn_lab, _ = synthetic.generate(jax.random.fold_in(k, 1), gen, n_synthetic)
        x, y_lab = jnp.concatenate([x, polar.to_polar(syn)]), jnp.concatenate([y_lab, syn_lab])
    return x, (y_lab[:, None] == head_regions[None, :]).astype(jnp.float32), k_drop
