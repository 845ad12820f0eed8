"""What deepalign's glibc malloc setting (`deepalign_cli/host_malloc.py`) buys: the same JAX
training epoch and prediction with the setting on and off, in alternating fresh processes.
A one-off study (2026-11-26; RESULTS.md, "glibc malloc").

    .venv/bin/python benchmarks/experiments/malloc_ab.py [--sizes 32 64 120] [--pairs 2]

Each measurement is a fresh interpreter (glibc reads the setting once per process) that applies
`runtime.configure_process` (the thresholds unless ``DEEPALIGN_MALLOC_TUNING=0``) and runs
`train_predict.jax_train_rate` (one region's epoch through `train_regions`: image-steps/s) and
`train_predict.jax_predict_rate` (42 nets, the CPU loop: particle·region/s), counting the
process's minor page faults during the timed training call. On/off alternate, `--pairs` times
per box, so the ratio is measured side by side. Results: stdout (markdown) and
benchmarks/results/malloc_ab.json (`_harness.write_result`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS))
from _harness import write_result  # noqa: E402

CHILD = r"""
import json, resource, sys
from deepalign_cli.runtime import configure_process
configure_process()  # before JAX starts; DEEPALIGN_MALLOC_TUNING=0 leaves malloc alone
sys.path.insert(0, {benchmarks!r})
import train_predict as tp
from deepalign_cli import host_malloc
from deepalign_cli.config import TrainConfig
box = {box}
host_malloc.share_one_arena(box)  # what `deepalign train`/`predict` do (nothing below 48 px)
cfg = TrainConfig()
steps, n_pred = (2, 512) if box >= 100 else (6, 2048)
tp.jax_train_rate(box, steps, cfg)  # warm the heap (and compile) once
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
train = tp.jax_train_rate(box, steps, cfg)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
predict = tp.jax_predict_rate(box, n_pred, cfg, "loop")
print(json.dumps({{"applied": host_malloc.configure(), "one_arena": host_malloc.share_one_arena(box), "train": train, "predict": predict, "faults": faults}}))
"""


def measure(box: int, tuning: str) -> dict:
    env = {**os.environ, "DEEPALIGN_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", CHILD.format(benchmarks=str(BENCHMARKS), box=box)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 120])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/malloc_ab.json)")
    a = ap.parse_args()
    res = {"sizes": a.sizes, "boxes": {}}
    rows = []
    for box in a.sizes:
        pairs = []
        for _ in range(a.pairs):
            pair = {"off": measure(box, "0"), "on": measure(box, "1")}
            pairs.append(pair)
            print(box, "px:", json.dumps(pair), file=sys.stderr, flush=True)
        res["boxes"][box] = pairs
        tr = " / ".join(f"{p['off']['train']:.0f} → {p['on']['train']:.0f} ({p['on']['train'] / p['off']['train']:.2f}×)" for p in pairs)
        pr = " / ".join(f"{p['off']['predict']:.0f} → {p['on']['predict']:.0f} ({p['on']['predict'] / p['off']['predict']:.2f}×)" for p in pairs)
        fl = " / ".join(f"{p['off']['faults']:,} → {p['on']['faults']:,}" for p in pairs)
        rows.append(f"| {box} | {tr} | {pr} | {fl} |")
    print("| box px | train img-steps/s off → on, per pair | predict particle·region/s off → on | page faults in the timed training call |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print(f"→ {write_result('malloc_ab', res, a.out)}")


if __name__ == "__main__":
    main()
