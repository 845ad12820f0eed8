"""Memory-traffic roofline of the region nets: bytes and FLOP per image from XLA's cost analysis.

    python benchmarks/roofline.py [--box 120] [--rate-predict 94770] [--rate-train 31320]

Compiles the accelerator formulation (`cnn.conv_impls_for(..., backend="gpu")`: FFT for every
kernel of 12 px and up) for the CPU and reads XLA's "bytes accessed" and "flops" for one net's
forward pass (what `predict` runs per particle and region) and one region's training step (per
image of the batch). With measured rates (particle·region/s, image-steps/s, e.g. from
`benchmarks/gpu.py`) it prints the memory bandwidth those rates imply, to set beside the card's
(H100 SXM: 3.35 TB/s). XLA:CPU's fusions are not XLA:GPU's, so the byte counts are an estimate of
what the GPU programs move, not a measurement of them. Results: stdout (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import cnn, training  # noqa: E402


def _cost(fn, *args) -> dict:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", float("nan"))), "bytes": float(cost.get("bytes accessed", float("nan")))}


def _model(box: int, cfg: TrainConfig, backend: str):
    arch = cnn.architecture(cfg, box, 1)
    return cnn.build_model(arch, "auto", backend)


def forward_cost(box: int, cfg: TrainConfig, backend: str = "gpu", batch: int = 128) -> dict:
    """Per image: one net's eval-mode forward pass."""
    model = _model(box, cfg, backend)
    v = training.init_region_params(jax.random.key(0), cfg, box, 1)[0]
    x = jnp.zeros((batch, box, box, 1), jnp.float32)
    c = _cost(lambda v, x: model.apply(v, x, train=False), {"params": v["params"], "batch_stats": v["batch_stats"]}, x)
    return {"impls": list(model.conv_impls), **{k: val / batch for k, val in c.items()}}


def forward_vmapped_cost(box: int, cfg: TrainConfig, n_nets: int = 42, backend: str = "gpu", batch: int = 64) -> dict:
    """Per image and net: `n_nets` stacked nets vmapped over one chunk (predict's accelerator path)."""
    model = _model(box, cfg, backend)
    vs = [
        training.init_region_params(jax.random.key(i), cfg, box, 1)[0] for i in range(n_nets)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[{"params": v["params"], "batch_stats": v["batch_stats"]} for v in vs])
    f = jax.vmap(lambda v, x: model.apply(v, x[..., None], train=False)[:, 0], in_axes=(0, None))
    c = _cost(f, stacked, jnp.zeros((batch, box, box), jnp.float32))
    return {"impls": list(model.conv_impls), **{k: val / (batch * n_nets) for k, val in c.items()}}


def train_step_cost(box: int, cfg: TrainConfig, backend: str = "gpu") -> dict:
    """Per image of the batch: one region's training step (sampling, augmentation, Adam update)."""
    import optax

    model = _model(box, cfg, backend)
    v = training.init_region_params(jax.random.key(0), cfg, box, 1)[0]
    opt = optax.adam(cfg.learning_rate).init(v["params"])
    step = training._region_step_body(model, cfg.learning_rate, cfg.batch_size, cfg.max_shift_frac * box)
    imgs = jnp.zeros((512, box, box), jnp.float32)
    idx = jnp.arange(512, dtype=jnp.int32)
    c = _cost(step, v["params"], v["batch_stats"], opt, imgs, idx, jnp.int32(256), idx, jnp.int32(256), jax.random.key(0))
    return {"impls": list(model.conv_impls), **{k: val / cfg.batch_size for k, val in c.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=120)
    p.add_argument("--backend", default="gpu", help="formulation to count: 'gpu' (accelerator) or 'cpu'")
    p.add_argument("--rate-predict", type=float, default=94770.0, help="measured particle·region/s")
    p.add_argument("--rate-train", type=float, default=31320.0, help="measured image-steps/s")
    p.add_argument("--n-nets", type=int, default=42)
    a = p.parse_args()
    cfg = TrainConfig()
    with jax.default_device(jax.devices("cpu")[0]):
        fwd, step = forward_cost(a.box, cfg, a.backend), train_step_cost(a.box, cfg, a.backend)
        vm = forward_vmapped_cost(a.box, cfg, a.n_nets, a.backend)
    out = {"box": a.box, "backend_formulation": a.backend,
           "forward_per_image": {"MB": fwd["bytes"] / 1e6, "GFLOP": fwd["flops"] / 1e9, "impls": fwd["impls"]},
           f"forward_{a.n_nets}_nets_vmapped_per_image_and_net": {"MB": vm["bytes"] / 1e6, "GFLOP": vm["flops"] / 1e9},
           "train_step_per_image": {"MB": step["bytes"] / 1e6, "GFLOP": step["flops"] / 1e9, "impls": step["impls"]},
           "predict_TB_per_s_at_rate": {"one_net": fwd["bytes"] * a.rate_predict / 1e12,
                                        "vmapped": vm["bytes"] * a.rate_predict / 1e12},
           "train_TB_per_s_at_rate": step["bytes"] * a.rate_train / 1e12}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
