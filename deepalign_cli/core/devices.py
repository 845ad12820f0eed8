"""Spreading work over several JAX devices with ``jax.sharding`` (1-D meshes, explicit padding).

How sharding is chosen:

* The devices are ``jax.devices()`` — every device of the default backend (all GPUs of the host, or
  the CPU devices that ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` creates). With ONE
  device :func:`mesh_1d` returns ``None`` and every caller keeps its single-device code path
  unchanged (same programs, same shapes, same results).
* With D > 1 devices a 1-D :class:`jax.sharding.Mesh` over all of them is built, with one axis name
  per use: ``"regions"`` (training and prediction: the stacked per-region networks, one slice of
  regions per device, the images replicated) and ``"particles"`` (alignment: the particle chunks,
  one slice of particles per device, the references and the map replicated).
* The sharded axis is padded to a multiple of D (:func:`pad_to_multiple`, :func:`pad_leading` —
  padding repeats the first entry, so padded rows compute valid numbers) and the padded results are
  dropped by the caller; nothing is ever split unevenly.
* The per-device programs are written with ``jax.shard_map`` (:func:`shard_map`): each device runs
  the single-device computation on its own slice, with no collectives, so a row's result does not
  depend on the number of devices beyond the usual floating-point reordering of a different batch
  size.

Pure JAX; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

P = PartitionSpec
REGION_AXIS = "regions"
PARTICLE_AXIS = "particles"


def device_count() -> int:
    """Number of devices of the default backend (``len(jax.devices())``)."""
    return len(jax.devices())


def memory_bytes() -> int | None:
    """The allocator's limit on the first device, in bytes (on a GPU JAX's pool, by default 75 %
    of the card), or None where the backend does not report one (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without memory statistics
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


@lru_cache(maxsize=8)
def _mesh(axis_name: str, devices: tuple) -> Mesh:
    return Mesh(np.array(devices, dtype=object), (axis_name,))


def mesh_1d(axis_name: str) -> Mesh | None:
    """1-D mesh named ``axis_name`` over all ``jax.devices()``; ``None`` when there is only one
    (callers then run their single-device path). Cached, so equal calls return the same mesh (which
    keeps ``lru_cache``-d program builders keyed on it)."""
    devices = tuple(jax.devices())
    if len(devices) <= 1:
        return None
    return _mesh(axis_name, devices)


def region_mesh() -> Mesh | None:
    """The ``"regions"`` mesh (training / prediction), or None on one device."""
    return mesh_1d(REGION_AXIS)


def particle_mesh() -> Mesh | None:
    """The ``"particles"`` mesh (alignment), or None on one device."""
    return mesh_1d(PARTICLE_AXIS)


def mesh_size(mesh: Mesh | None) -> int:
    """Devices in the mesh (1 for None)."""
    return 1 if mesh is None else int(mesh.devices.size)


def pad_to_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is ≥ n (n itself when k ≤ 1)."""
    n, k = int(n), int(k)
    if k <= 1:
        return n
    return -(-n // k) * k


def pad_leading(tree: Any, n_total: int) -> Any:
    """Pad the leading axis of every leaf to n_total by repeating its first entry (numpy or JAX)."""

    def pad(a):
        n = a.shape[0]
        if n == n_total:
            return a
        xp = np if isinstance(a, np.ndarray) else jnp
        return xp.concatenate([a, xp.repeat(a[:1], n_total - n, axis=0)])

    return jax.tree_util.tree_map(pad, tree)


def pad_indices(idx: np.ndarray, n_total: int) -> np.ndarray:
    """Index array padded to n_total with its first entry (duplicated rows; results discarded)."""
    idx = np.asarray(idx)
    if len(idx) >= n_total:
        return idx
    return np.concatenate([idx, np.full(n_total - len(idx), idx[0], idx.dtype)])


def shard_leading(tree: Any, mesh: Mesh | None, axis_name: str | None = None) -> Any:
    """Place every leaf with its leading axis split over the mesh (``PartitionSpec(axis_name)``).

    The leading axis must be a multiple of the mesh size (pad first). mesh None → unchanged."""
    if mesh is None:
        return tree
    name = axis_name or mesh.axis_names[0]
    return jax.device_put(tree, NamedSharding(mesh, P(name)))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Place every leaf whole on every device of the mesh (``PartitionSpec()``). None → unchanged."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_map(f: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """``jax.shard_map`` without the replication check (the bodies are plain per-device code)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as _sm  # older JAX

    return _sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
