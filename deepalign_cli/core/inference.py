"""Prediction: the probability that each particle image belongs to each trained region.

The trained regions' networks are evaluated in one of a few formulations, each a pair of pure
functions (`Formulation`: `prepare` once per run, `logits` per chunk of images) chosen in one
place (`choose_formulation`):

* ``one_net`` — a one-net model (the polar trunk): one forward pass, its heads are the regions.
* ``shared_first`` — per-region batch-norm nets whose first layer is a direct convolution (the
  CPU default): the first layer of many nets runs as ONE convolution on the shared images
  (`shared_first_block`, batch norm folded), then each net's remaining layers (`tail_eval`).
* ``loop`` — one jitted net after another per chunk (CPU with FFT or s2d first layers, where the
  shared first layer loses).
* ``vmap`` — all nets stacked and vmapped, one call per chunk sized to the device memory
  (`vmap_chunk_size`; the accelerator default); with several devices the stacked region axis is
  split over them (`devices.region_mesh`).

Every formulation gives each net's own eval-mode forward to float32 rounding (tested); which one
is fastest where is measured in RESULTS.md ("Training and prediction speed", "On one GPU").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import DeepAlignError
from . import devices, models
from .cnn import BATCH_NORM_EPSILON, CONVS, RegionCNN, conv2d_direct, conv2d_fft, max_pool2

# Device bytes of the vmapped forward pass (and training step) per image, per stacked net, per
# pixel of the box and per channel of the first layer: ~2× what an H100 needed at 120 px
# (RESULTS.md, "On one GPU").
VMAP_BYTES_PER_PX_CHANNEL = 32
VMAP_DEVICE_FRACTION = 0.8
SHARED_FIRST_BYTES = 256 * 2**20  # default bound on one group's first-block activations (1/16 of 4 GB)
FORMULATIONS = ("auto", "shared_first", "loop", "vmap")  # what `region_parallel` may name


# --------------------------------------------------------------------------- evaluation helpers


@lru_cache(maxsize=32)
def logits_fn(model: nn.Module):
    """Jitted eval-mode forward: (variables, images (B, N, N)) -> (B, n_heads) logits."""
    return jax.jit(lambda variables, x: model.apply(variables, x[..., None], train=False))


def padded_batches(images, batch_size: int):
    """(start, m, (batch_size, N, N) float32 device array) over `images` (n, N, N) — numpy or memmap,
    read one batch at a time — with the last batch zero-padded, so one compiled shape serves all."""
    for start in range(0, images.shape[0], batch_size):
        chunk = np.asarray(images[start : start + batch_size], np.float32)
        m = chunk.shape[0]
        if m < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], np.float32)])
        yield start, m, jnp.asarray(chunk)


def chunked_logits(fn, variables, images, batch_size: int) -> np.ndarray:
    """Apply a jitted forward over `images` (n, N, N) in fixed-size chunks (last chunk padded).

    One chunk stays in flight: the next chunk is read and dispatched before the previous result is
    copied back, so reading, transfers and the device's work overlap (JAX dispatches asynchronously)."""
    out, pending = [], None
    for _, m, x in padded_batches(images, batch_size):
        y = fn(variables, x)
        if pending is not None:
            out.append(np.asarray(pending[1])[: pending[0]])
        pending = (m, y)
    if pending is not None:
        out.append(np.asarray(pending[1])[: pending[0]])
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def fold_batch_norm(params: dict, batch_stats: dict, layer: int) -> tuple[jax.Array, jax.Array]:
    """Kernel and bias of conv `layer` with its eval-mode batch norm folded in.

    Eval-mode batch norm is per channel y = a·(conv(x) + b − mean) + β, a = scale / sqrt(var + ε),
    so BN(conv(x; w, b)) = conv(x; a·w) + a·(b − mean) + β exactly (to float32 rounding).
    params / batch_stats: one `RegionCNN`'s. Returns (kh, kw, Cin, Cout), (Cout,)."""
    bn, st, conv = params[f"BatchNorm_{layer}"], batch_stats[f"BatchNorm_{layer}"], params[f"Conv_{layer}"]
    a = bn["scale"] * lax.rsqrt(st["var"] + BATCH_NORM_EPSILON)
    return conv["kernel"] * a, a * (conv["bias"] - st["mean"]) + bn["bias"]


def shared_first_block(x: jax.Array, kernels: jax.Array, biases: jax.Array, impl: str) -> jax.Array:
    """Eval-mode first block (conv → batch norm → ReLU → 2×2 max-pool) of G per-region nets on
    the same images, as ONE convolution with G·C outputs.

    The first layer has one input channel, so stacking the G nets' kernels along the output
    channels is an ordinary convolution, not a grouped one: the image side (the input transform
    of the FFT path) is done once and the direct path runs a G× wider, much more efficient GEMM.
    x: (B, N, N) images.  kernels: (G, k, k, 1, C), biases: (G, C) — batch norm folded in
    (`fold_batch_norm`).  impl: "direct" | "fft" | "s2d" ("s2d" runs the direct convolution:
    with G·C output channels XLA vectorises it already).  Returns (G, B, N//2, N//2, C)."""
    g, k, _, _, c = kernels.shape
    w = kernels.transpose(1, 2, 3, 0, 4).reshape(k, k, 1, g * c)
    bias = biases.reshape(g * c)
    if impl == "fft":  # the transforms' own layout: pool channels-first, transpose the quarter
        y = max_pool2(conv2d_fft(x[..., None], w, channels_first_out=True) + bias[:, None, None], channels_first=True)
        b, _, h, wd = y.shape
        return nn.relu(y.reshape(b, g, c, h, wd).transpose(1, 0, 3, 4, 2))
    y = max_pool2(conv2d_direct(x[..., None], w) + bias)
    b, h, wd, _ = y.shape
    return nn.relu(y.reshape(b, h, wd, g, c).transpose(3, 0, 1, 2, 4))


def tail_eval(model: RegionCNN, params: dict, batch_stats: dict, h: jax.Array) -> jax.Array:
    """Eval-mode rest of a `RegionCNN` after its first block: conv blocks 2… with the batch norm
    folded in, then dense ReLU and the heads (dropout is the identity in eval).
    h: (B, N//2, N//2, C1) from `shared_first_block`.  Returns (B, n_heads) logits, equal to
    ``model.apply(…, train=False)`` to float32 rounding."""
    for i in range(1, len(model.conv_filters)):
        w, c = fold_batch_norm(params, batch_stats, i)
        h = nn.relu(max_pool2(CONVS[model.conv_impls[i]](h, w) + c))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(h @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


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


def vmap_chunk_size(batch_size: int, box: int, first_channels: int, n_nets: int, device_bytes: int | None) -> int:
    """Images per call of the stacked (vmapped) nets: `batch_size`, lowered so that n_nets nets'
    activations fit `VMAP_DEVICE_FRACTION` of the device's memory (unchanged where the backend
    reports none). 120 px, 42 nets, H100: 166 (the default batch of 512 ran out of memory)."""
    if not device_bytes:
        return batch_size
    per_image = n_nets * box * box * first_channels * VMAP_BYTES_PER_PX_CHANNEL
    return int(max(1, min(batch_size, VMAP_DEVICE_FRACTION * device_bytes // per_image)))


# --------------------------------------------------------------------------- formulations


class Formulation(NamedTuple):
    """prepare(model, box, variables: list of R trees, heads: list of R ints, batch_size, max_bytes) ->
    prepared (once per run); logits(prepared, images (n, N, N)) -> (n, R) float32 logits."""

    prepare: Callable[..., Any]
    logits: Callable[[Any, Any], np.ndarray]


def _one_net_prepare(model, box, variables, heads, batch_size, max_bytes):
    return logits_fn(model), variables[0], np.asarray(heads), batch_size


def _one_net_logits(prepared, images):
    fn, variables, heads, batch_size = prepared
    return chunked_logits(fn, variables, images, batch_size)[:, heads]


def _loop_prepare(model, box, variables, heads, batch_size, max_bytes):
    return logits_fn(model), variables, batch_size


def _loop_logits(prepared, images):
    fn, variables, batch_size = prepared
    out = np.zeros((images.shape[0], len(variables)), np.float32)
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        for j, v in enumerate(variables):
            out[start : start + chunk.shape[0], j] = chunked_logits(fn, v, chunk, batch_size)[:, 0]
    return out


@lru_cache(maxsize=32)
def _shared_first_fns(model: RegionCNN):
    fold = jax.jit(lambda p, s: fold_batch_norm(p, s, 0))
    first = jax.jit(partial(shared_first_block, impl=model.conv_impls[0]))
    tail = jax.jit(lambda p, s, h, j: tail_eval(model, p, s, lax.dynamic_index_in_dim(h, j, keepdims=False))[:, 0])
    return fold, first, tail


def _shared_first_prepare(model, box, variables, heads, batch_size, max_bytes):
    """Groups of G nets whose first-layer activations (batch_size images) fit `max_bytes`, equal
    in size (the last padded with repeats of its first net, so one compiled shape serves all)."""
    n_nets = len(variables)
    fold, first, tail = _shared_first_fns(model)
    per_net = batch_size * model.conv_filters[0] * box**2 * 4  # the first conv's output, before the pool
    n_groups = -(-n_nets // max(1, min(n_nets, int(max_bytes // per_net))))
    g = -(-n_nets // n_groups)
    folded = [fold(v["params"], v["batch_stats"]) for v in variables]
    groups = []
    for s0 in range(0, n_nets, g):
        members = list(range(s0, min(s0 + g, n_nets)))
        padded = members + [members[0]] * (g - len(members))
        groups.append((members, jnp.stack([folded[i][0] for i in padded]), jnp.stack([folded[i][1] for i in padded])))
    return first, tail, variables, groups, batch_size


def _shared_first_logits(prepared, images):
    first, tail, variables, groups, batch_size = prepared
    out = np.zeros((images.shape[0], len(variables)), np.float32)
    for start, m, x in padded_batches(images, batch_size):
        cols = []
        for members, kernels, biases in groups:
            h = first(x, kernels, biases)
            cols += [tail(variables[i]["params"], variables[i]["batch_stats"], h, j) for j, i in enumerate(members)]
        out[start : start + m] = np.stack([np.asarray(c) for c in cols], axis=1)[:m]
    return out


@lru_cache(maxsize=32)
def _logits_stacked_fn(model: nn.Module, mesh=None):
    """Jitted eval forward of R stacked nets: (R-stacked variables, (B, N, N)) -> (B, R); with a
    "regions" mesh the stacked axis is split over its devices and the images replicated."""
    f = jax.vmap(lambda v, x: model.apply(v, x[..., None], train=False)[:, 0], in_axes=(0, None))
    if mesh is None:
        return jax.jit(lambda variables, x: f(variables, x).T)
    ax = devices.REGION_AXIS
    g = jax.jit(devices.shard_map(lambda v, x: f(v, x).T, mesh, in_specs=(devices.P(ax), devices.P()), out_specs=devices.P(None, ax)))
    return lambda variables, x: g(variables, devices.replicate(x, mesh))


def _vmap_prepare(model, box, variables, heads, batch_size, max_bytes):
    mesh = devices.region_mesh()
    per_device = -(-len(variables) // devices.mesh_size(mesh))
    chunk = vmap_chunk_size(batch_size, box, model.conv_filters[0], per_device, devices.memory_bytes())
    return _logits_stacked_fn(model, mesh), stack_region_variables(variables, mesh), chunk, len(variables)


def _vmap_logits(prepared, images):
    fn, stacked, chunk, n_nets = prepared
    return chunked_logits(fn, stacked, images, chunk)[:, :n_nets]  # drop the padded nets of a mesh


ONE_NET = Formulation(_one_net_prepare, _one_net_logits)
SHARED_FIRST = Formulation(_shared_first_prepare, _shared_first_logits)
LOOP = Formulation(_loop_prepare, _loop_logits)
VMAP = Formulation(_vmap_prepare, _vmap_logits)


def choose_formulation(model: nn.Module, one_net: bool, region_parallel: str = "auto", backend: str | None = None) -> Formulation:
    """The formulation for these nets: one_net for one-net models; else `region_parallel`
    ("shared_first", "loop", "vmap") or "auto": on CPU the shared first layer where the first
    layer is a direct convolution, else the loop; on accelerators (and over several devices) vmap."""
    if region_parallel not in FORMULATIONS:
        raise DeepAlignError(f"predict: region_parallel {region_parallel!r}; choose one of {', '.join(FORMULATIONS)}")
    if one_net:
        return ONE_NET
    if region_parallel == "auto":
        if (backend or jax.default_backend()) != "cpu":
            return VMAP
        return SHARED_FIRST if model.conv_impls[0] == "direct" else LOOP
    return {"shared_first": SHARED_FIRST, "loop": LOOP, "vmap": VMAP}[region_parallel]


class Predictor(NamedTuple):
    """Trained nets ready to evaluate: `regions` (sorted) are the columns of `predict`'s output."""

    regions: list[int]
    formulation: Formulation
    prepared: Any


def prepare(models_by_region: dict, batch_size: int, region_parallel: str = "auto", memory_budget_gb: float | None = None) -> Predictor:
    """Build the model once and prepare the trained regions' nets for prediction.

    models_by_region: {region: entry} as returned by `training.train_regions` (or restored
    checkpoints); entries without params (skipped regions) are ignored.  memory_budget_gb: the
    shared-first formulation keeps its first-layer activations to 1/16 of it (default
    `SHARED_FIRST_BYTES`)."""
    regions = sorted(r for r, m in models_by_region.items() if m.get("params") is not None)
    if not regions:
        raise DeepAlignError("predict: no trained region models")
    arch = models_by_region[regions[0]]["arch"]
    model = models.build(arch, "auto")
    formulation = choose_formulation(model, models.of_arch(arch).one_net, region_parallel)
    variables = [{"params": models_by_region[r]["params"], "batch_stats": models_by_region[r]["batch_stats"]} for r in regions]
    heads = [int(models_by_region[r]["head"]) for r in regions]
    max_bytes = SHARED_FIRST_BYTES if memory_budget_gb is None else memory_budget_gb * 2**30 / 16
    return Predictor(regions, formulation, formulation.prepare(model, int(arch["box_px"]), variables, heads, batch_size, max_bytes))


def predict(predictor: Predictor, images) -> np.ndarray:
    """(n, R) float32 probabilities (sigmoid of each region's head) of images (n, N, N) (numpy or
    memmap, read in chunks), columns in `predictor.regions` order."""
    return np.asarray(jax.nn.sigmoid(predictor.formulation.logits(predictor.prepared, images)), np.float32)


def predict_probs(models_by_region: dict, images, batch_size: int, region_parallel: str = "auto",
                  memory_budget_gb: float | None = None) -> np.ndarray:
    """`predict` with the nets prepared for this call (see `prepare`)."""
    return predict(prepare(models_by_region, batch_size, region_parallel, memory_budget_gb), images)
