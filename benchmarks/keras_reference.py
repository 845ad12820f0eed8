"""The paper's network in Keras on TensorFlow-CPU — the reference stack for benchmarks only
(optional `bench` extra; never imported by deepalign itself).

Same layers as `deepalign_cli.core.cnn.RegionCNN`: Conv2D 'same' (ReLU after BatchNormalization),
MaxPool2D 2×2, Dropout, Dense 256 ReLU, Dense 1 sigmoid; Adam; trained one region after another.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def build(box_px: int, kernels, filters=(16, 32, 64), dense_units=256, dropout=0.2, lr=2e-3):
    """Compiled Keras model for (box, box, 1) inputs, binary cross-entropy, Adam(lr)."""
    import tensorflow as tf

    layers = tf.keras.layers
    inp = layers.Input((box_px, box_px, 1))
    x = inp
    for f, k in zip(filters, kernels):
        x = layers.Conv2D(f, k, padding="same")(x)
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-3)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPool2D(2)(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(dense_units, activation="relu")(x)
    out = layers.Dense(1, activation="sigmoid")(x)
    model = tf.keras.Model(inp, out)
    model.compile(optimizer=tf.keras.optimizers.Adam(lr), loss="binary_crossentropy", metrics=["accuracy"])
    return model


def time_train_steps(model, images, labels, n_steps: int, batch_size: int = 128) -> float:
    """Image-steps/s of `n_steps` train_on_batch calls after one warm-up step."""
    import time

    import numpy as np

    x, y = images[:batch_size, :, :, None], labels[:batch_size].astype(np.float32)
    model.train_on_batch(x, y)
    t = time.perf_counter()
    for _ in range(n_steps):
        model.train_on_batch(x, y)
    return n_steps * batch_size / (time.perf_counter() - t)


def time_predict(model, images, batch_size: int = 512) -> float:
    """Particles/s of one model's predict over `images` (after a warm-up call)."""
    import time

    x = images[..., None]
    model.predict(x[:batch_size], batch_size=batch_size, verbose=0)
    t = time.perf_counter()
    model.predict(x, batch_size=batch_size, verbose=0)
    return x.shape[0] / (time.perf_counter() - t)
