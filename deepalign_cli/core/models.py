"""The one place that chooses the region classifier (`TrainConfig.model`) and builds it.

* ``per_region`` — the paper's method: one binary `cnn.RegionCNN` per region, each trained on its
  own balanced batches (`training`), evaluated together by `inference`.
* ``polar_trunk`` — beyond the paper: one rotation-invariant `polar.PolarCNN` with a sigmoid head
  per region, trained on batches stratified over all labels.

Each model also carries its default ``train.synthetic_fraction`` (the share of every training
batch made from the reference, `core.synthetic`), chosen by measurement (RESULTS.md, "Synthetic
examples made in the training step"): 0.9 for the polar trunk (held-out top-2 at SNR 0.05:
0.344 → 0.396 with 71 labelled particles per region, mean of three seeds; 0.119 → 0.361 with 7;
0.979 → 0.987 on the demo),
0 for the per-region nets, the paper's recipe (at SNR 0.05 they stay at chance either way).

A checkpoint's ``arch`` dict names its model (``arch["model"]``; absent in the per-region nets'
checkpoints, which predate the choice), so `build` rebuilds whatever a checkpoint holds. The
shared-trunk model (an ordinary `RegionCNN` with a head per region) was removed: it did not reach
the per-region accuracy (RESULTS.md, "Region classifiers").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn

from . import cnn, polar


class Model(NamedTuple):
    """A region classifier: how to describe it for a box and how to build it from that description."""

    name: str
    one_net: bool  # one network with a head per region (else one network per region)
    architecture: Callable[[Any, int, int], dict]  # (cfg, box_px, n_heads) -> arch
    build: Callable[..., nn.Module]  # (arch, conv_impl="auto", backend=None) -> module
    synthetic_fraction: float  # default train.synthetic_fraction


MODELS = {
    "per_region": Model("per_region", False, cnn.architecture, cnn.build, 0.0),
    "polar_trunk": Model("polar_trunk", True, polar.architecture, polar.build, 0.9),
}


def get(name: str) -> Model:
    """The model called `name` (a `TrainConfig.model` value or a checkpoint's ``arch["model"]``)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def synthetic_fraction(cfg: Any) -> float:
    """cfg.synthetic_fraction, or cfg.model's default when it is None."""
    return get(cfg.model).synthetic_fraction if cfg.synthetic_fraction is None else float(cfg.synthetic_fraction)


def of_arch(arch: dict) -> Model:
    return get(arch.get("model", "per_region"))


def architecture(cfg: Any, box_px: int, n_regions: int) -> dict:
    """The ``arch`` dict of cfg.model for `n_regions` trained regions (n_heads = n_regions for a
    one-net model, else 1)."""
    model = get(cfg.model)
    return model.architecture(cfg, box_px, n_regions if model.one_net else 1)


def build(arch: dict, conv_impl: str = "auto", backend: str | None = None) -> nn.Module:
    """The Flax module an ``arch`` dict describes."""
    return of_arch(arch).build(arch, conv_impl, backend)
