"""Memory-traffic roofline of the region nets: bytes and FLOP per image from XLA's cost analysis.
A one-off estimate (2026-11-26; RESULTS.md, "On one GPU").

    python benchmarks/experiments/roofline.py [--box 120] [--rate-predict 94770] [--rate-train 31320]

Compiles the accelerator formulation (`cnn.conv_impls_for(..., backend="gpu")`: FFT for every
kernel of 12 px and up) for the CPU and reads XLA's "bytes accessed" and "flops" for one net's
forward pass (what `predict` runs per particle and region) and one region's training step (per
image of the batch). With measured rates (particle·region/s, image-steps/s, e.g. from
`benchmarks/gpu.py`) it prints the memory bandwidth those rates imply, to set beside the card's
(H100 SXM: 3.35 TB/s). XLA:CPU's fusions are not XLA:GPU's, so the byte counts are an estimate of
what the GPU programs move, not a measurement of them. Results: stdout (JSON) and
benchmarks/results/roofline.json (`_harness.write_result`).
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # before JAX starts

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import write_result, xla_cost  # noqa: E402
from train_predict import forward_cost, train_step_cost  # noqa: E402

from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import cnn, inference, training  # noqa: E402


def _impls(box: int, cfg: TrainConfig, backend: str) -> tuple[str, ...]:
    return cnn.conv_impls_for(cnn.kernel_sizes(box, cfg.kernel_fractions), "auto", backend)


def forward_vmapped_cost(box: int, cfg: TrainConfig, impls, n_nets: int = 42, batch: int = 64) -> dict:
    """Per image and net: `n_nets` stacked nets vmapped over one chunk (predict's accelerator path)."""
    model = cnn.build(cnn.architecture(cfg, box, 1), cfg.conv_impl).clone(conv_impls=tuple(impls))
    stacked = inference.stack_region_variables(training.init_region_params(jax.random.key(0), cfg, box, n_nets))
    f = jax.vmap(lambda v, x: model.apply(v, x[..., None], train=False)[:, 0], in_axes=(0, None))
    c = xla_cost(f, stacked, jnp.zeros((batch, box, box), jnp.float32))
    return {k: val / (batch * n_nets) for k, val in c.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=120)
    p.add_argument("--backend", default="gpu", help="formulation to count: 'gpu' (accelerator) or 'cpu'")
    p.add_argument("--rate-predict", type=float, default=94770.0, help="measured particle·region/s")
    p.add_argument("--rate-train", type=float, default=31320.0, help="measured image-steps/s")
    p.add_argument("--n-nets", type=int, default=42)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/roofline.json)")
    a = p.parse_args()
    cfg = TrainConfig()
    impls = _impls(a.box, cfg, a.backend)
    with jax.default_device(jax.devices("cpu")[0]):
        fwd = {k: v / 128 for k, v in forward_cost(a.box, cfg, impls).items()}
        step = {k: v / cfg.batch_size for k, v in train_step_cost(a.box, cfg, impls).items()}
        vm = forward_vmapped_cost(a.box, cfg, impls, a.n_nets)
    out = {"box": a.box, "backend_formulation": a.backend, "conv_impls": list(impls),
           "forward_per_image": {"MB": fwd["bytes"] / 1e6, "GFLOP": fwd["flops"] / 1e9},
           f"forward_{a.n_nets}_nets_vmapped_per_image_and_net": {"MB": vm["bytes"] / 1e6, "GFLOP": vm["flops"] / 1e9},
           "train_step_per_image": {"MB": step["bytes"] / 1e6, "GFLOP": step["flops"] / 1e9},
           "predict_TB_per_s_at_rate": {"one_net": fwd["bytes"] * a.rate_predict / 1e12,
                                        "vmapped": vm["bytes"] * a.rate_predict / 1e12},
           "train_TB_per_s_at_rate": step["bytes"] * a.rate_train / 1e12}
    print(json.dumps(out, indent=1))
    print(f"→ {write_result('roofline', out, a.out)}")


if __name__ == "__main__":
    main()
