"""The train/validation split of the labelled particles.

Training holds out a stratified share of every region's particles for validation (early
stopping) and `predict --coverage` calibrates on exactly those particles, so the split is a pure
function of (seed key, labels, fraction) and carries a digest that the train stage records.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SPLIT_STREAM = 2**20  # fold_in tag of the split (outside the region-id range of the training streams)


class Split(NamedTuple):
    """Sorted int64 indices of the training and validation particles."""

    train: np.ndarray
    val: np.ndarray

    @property
    def val_digest(self) -> str:
        """sha256 (hex) of the validation indices, recorded by train and checked by predict."""
        return validation_digest(self.val)


def split_train_val(key: jax.Array, labels: np.ndarray, fraction: float) -> Split:
    """Stratified split: round(fraction · n_l) of every label l to validation.

    labels: (n,) int.  Returns Split(train, val), sorted int64 index arrays (it unpacks as a
    pair). The split of a label depends only on (key, label, its members), not on the other labels."""
    labels = np.asarray(labels)
    k_split = jax.random.fold_in(key, SPLIT_STREAM)
    train, val = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lab in np.unique(labels):
        members = np.flatnonzero(labels == lab)
        # numpy's permutation, seeded by the label's JAX key: jax.random.permutation compiles
        # once per array length (10 labels: 1.4 s of the 2-core CPU's start-up)
        perm = np.random.default_rng(key_words(jax.random.fold_in(k_split, int(lab)))).permutation(members.size)
        n_val = int(round(fraction * members.size))
        val.append(members[perm[:n_val]])
        train.append(members[perm[n_val:]])
    return Split(np.sort(np.concatenate(train)), np.sort(np.concatenate(val)))


def validation_split(labels: np.ndarray, seed: int, fraction: float) -> Split:
    """The split `train` makes with its config's seed and validation fraction."""
    return split_train_val(jax.random.key(int(seed)), labels, float(fraction))


def validation_digest(val_idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(val_idx).astype("<i8").tobytes()).hexdigest()


def key_words(key: jax.Array) -> list[int]:
    """The uint32 words of a JAX PRNG key (typed or raw), e.g. to seed numpy."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(w) for w in np.asarray(data).ravel()]
