"""`make bench`: run every benchmark in sequence (each writes benchmarks/results/<name>.json and
prints a markdown table; benchmarks/RESULTS.md collects the tables with machine and date).

    python benchmarks/run_all.py            # full sizes
    python benchmarks/run_all.py --quick    # a few minutes, for a smoke check
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
        path = HERE / name
        if not path.exists():
            continue
        print(f"\n=== {name} {' '.join(extra)} ===", flush=True)
        rc = subprocess.call([sys.executable, str(path), *extra])
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
