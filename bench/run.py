"""Every CPU benchmark side by side, and one table of their ratios against the goals.

    python bench/run.py               # about 8 minutes on 2 CPU cores
    python bench/run.py --fast        # convert at 512 px (the round trip at 1024 px takes minutes alone)

Runs bench/convert.py, bench/encode.py and bench/train.py one after another (each in its own process, so
none warms the next) and prints their output, then the table. bench/gpu.sh is the GPU counterpart.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, extra args, regex of the figure in its output, goal, what)
BENCHES = [
    ("convert.py", [], r"convert\(\).*->\s+([\d.]+)x faster", 300.0, "convert() vs VAE round trip (x faster)"),
    ("encode.py", [], r"ratio\s+[\d.]+ end to end, ([\d.]+) steady", 0.90, "pipeline / bare encoder (steady)"),
    ("train.py", [], r"ratio\s+([\d.]+)", 0.95, "Ray Train / bare loop"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="convert at 512 px instead of 1024 px")
    args = parser.parse_args()
    rows = []
    for script, extra, pattern, goal, what in BENCHES:
        if script == "convert.py" and args.fast:
            extra = ["--size", "512"]
        print(f"--- {script} {' '.join(extra)}", flush=True)
        result = subprocess.run([sys.executable, str(HERE / script), *extra], capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        print("\n".join(lines), flush=True)
        match = re.search(pattern, result.stdout)
        value = float(match.group(1)) if match else None
        if result.returncode or value is None:
            print(result.stderr[-2000:], file=sys.stderr)
        rows.append((what, value, goal))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
    print(f"{'benchmark':<42} {'figure':>9} {'goal':>7}  met")
    for what, value, goal in rows:
        shown = f"{value:9.3f}" if value is not None else f"{'failed':>9}"
        met = "yes" if value is not None and value >= goal else "no"
        print(f"{what:<42} {shown} {goal:>7g}  {met}")


if __name__ == "__main__":
    main()
