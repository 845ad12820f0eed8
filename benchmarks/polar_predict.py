"""Prediction speed of the polar trunk (one net, a head per region) against the paper's
per-region nets, side by side in one run.

    python benchmarks/polar_predict.py [--boxes 64 120] [--repeat 2]

Random normalised images, 42 regions, batch 512, weights at their initial values (the cost does
not depend on them). Per-region nets: `predict_probs` over 42 nets as `deepalign predict` runs
them on CPU (region_parallel "loop"); polar trunk: one forward pass gives all 42 probabilities.
Both in particle·region/s (particles/s × 42 for the polar trunk), a multiple of the batch so no
padding is timed. Results: stdout and benchmarks/results/polar_predict.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from deepalign_cli import host_malloc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 120])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--particles", type=int, default=512, help="per-region nets (the polar trunk gets 4×); a multiple of 512")
    a = ap.parse_args()
    host_malloc.share_one_arena(min(a.boxes))  # as `deepalign predict` does at these boxes
    import jax

    import train_predict as tp
    from deepalign_cli.config import TrainConfig

    cfg = TrainConfig()
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
           "backend": jax.default_backend(), "devices": str(jax.devices()), "regions": tp.N_REGIONS, "boxes": {}}
    print("| box px | per-region nets particle·region/s | polar trunk particle·region/s | polar / per-region |\n|---|---|---|---|")
    for box in a.boxes:
        runs = []
        for _ in range(a.repeat):
            per_region = tp.jax_predict_rate(box, a.particles, cfg, "loop")
            polar = tp.jax_one_net_predict_rate(box, 4 * a.particles, cfg, "polar_trunk")
            runs.append({"per_region_loop": per_region, "polar_trunk": polar, "ratio": polar / per_region})
            print(f"| {box} | {per_region:,.0f} | {polar:,.0f} | {polar / per_region:.1f}× |", flush=True)
        out["boxes"][box] = runs
    dest = HERE / "results" / "polar_predict.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"→ {dest}")


if __name__ == "__main__":
    main()
