"""`make bench`: run the recurring CPU benchmarks in sequence (each writes
benchmarks/results/<name>.json through `_harness.write_result`, with the machine, versions, git
commit and date, and prints a markdown table; benchmarks/RESULTS.md collects the tables).

    python benchmarks/run_all.py            # full sizes
    python benchmarks/run_all.py --quick    # smaller sizes, for a smoke check

Not run here: gpu.py and gpu_job.py (for a GPU lease), whole_job.py (needs TensorFlow),
polar_predict.py, synthetic_speed.py, region_classifiers.py (issue 24's matrix: ~50 min on 2
cores), and the one-off studies in benchmarks/experiments/.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["train_predict.py", "align.py", "accuracy.py", "large_stack.py"]


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for name in SCRIPTS:
        print(f"\n=== {name} {' '.join(extra)} ===", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / name), *extra])
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
