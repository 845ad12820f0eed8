"""Prediction speed of the polar trunk (one net, a head per region) against the paper's
per-region nets, side by side in one run.

    python benchmarks/polar_predict.py [--boxes 64 120] [--repeat 2]

Random normalised images, 42 regions, batch 512, weights at their initial values (the cost does
not depend on them). Per-region nets: `inference.predict` over 42 nets as `deepalign predict` runs
them on CPU (region_parallel "loop"); polar trunk: one forward pass gives all 42 probabilities.
Both in particle·region/s (particles/s × 42 for the polar trunk), a multiple of the batch so no
padding is timed. Results: stdout and benchmarks/results/polar_predict.json (`_harness.write_result`).
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # before JAX starts

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import write_result  # noqa: E402

from deepalign_cli import host_malloc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 120])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--particles", type=int, default=512, help="per-region nets (the polar trunk gets 4×); a multiple of 512")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/polar_predict.json)")
    a = ap.parse_args()
    host_malloc.share_one_arena(min(a.boxes))  # as `deepalign predict` does at these boxes, before JAX starts its threads
    import train_predict as tp

    from deepalign_cli.config import TrainConfig

    cfg = TrainConfig()
    out = {"regions": tp.N_REGIONS, "particles": a.particles, "boxes": {}}
    print("| box px | per-region nets particle·region/s | polar trunk particle·region/s | polar / per-region |\n|---|---|---|---|")
    for box in a.boxes:
        runs = []
        for _ in range(a.repeat):
            per_region = tp.jax_predict_rate(box, a.particles, cfg, "loop")
            polar = tp.jax_one_net_predict_rate(box, 4 * a.particles, cfg, "polar_trunk")
            runs.append({"per_region_loop": per_region, "polar_trunk": polar, "ratio": polar / per_region})
            print(f"| {box} | {per_region:,.0f} | {polar:,.0f} | {polar / per_region:.1f}× |", flush=True)
        out["boxes"][box] = runs
    print(f"→ {write_result('polar_predict', out, a.out)}")


if __name__ == "__main__":
    main()
