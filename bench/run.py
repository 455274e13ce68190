"""Every CPU benchmark side by side, and one table of their ratios against the goals.

    python bench/run.py               # 3 rounds each: about 20 minutes on 2 CPU cores
    python bench/run.py --fast        # 2 rounds, convert at 512 px: about 10 minutes

Runs bench/convert.py, bench/encode.py and bench/train.py one after another (each in its own process, so
none warms the next) and prints their output, then the table. Each benchmark alternates its two sides in
rounds and its figure is the median of the rounds' own ratios: on a shared machine whose speed drifts by
20-30% over minutes, only measurements taken side by side compare. bench/gpu.sh is the GPU counterpart.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, extra args, regex of the figure in its output, goal, what)
BENCHES = [
    ("convert.py", [], r"ratio\s+([\d.]+)x", 300.0, "convert() vs VAE round trip (x faster)"),
    ("encode.py", [], r"ratio\s+[\d.]+ end to end, ([\d.]+) steady", 0.90, "pipeline / bare encoder (steady)"),
    ("train.py", [], r"ratio\s+([\d.]+)", 0.95, "Ray Train / bare loop"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="convert at 512 px instead of 1024 px, 2 rounds")
    parser.add_argument("--repeats", type=int, help="rounds per benchmark (default 3, or 2 with --fast)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.fast else 3)
    rows = []
    for script, extra, pattern, goal, what in BENCHES:
        extra = [*extra, "--repeats", str(repeats)]
        if script == "convert.py" and args.fast:
            extra += ["--size", "512"]
        print(f"--- {script} {' '.join(extra)}", flush=True)
        # stdout streams through as it comes (rounds take minutes); stderr (Ray's logging) is kept for failures
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, str(HERE / script), *extra], stdout=subprocess.PIPE,
                                    stderr=err, text=True)
            out = []
            for line in proc.stdout:
                if line.strip():
                    print(line, end="", flush=True)
                    out.append(line)
            proc.wait()
            match = re.search(pattern, "".join(out))
            value = float(match.group(1)) if match else None
            if proc.returncode or value is None:
                err.seek(0)
                print(err.read()[-2000:], file=sys.stderr)
        rows.append((what, value, goal))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
    print(f"{'benchmark':<42} {'figure':>9} {'goal':>7}  met")
    for what, value, goal in rows:
        shown = f"{value:9.3f}" if value is not None else f"{'failed':>9}"
        met = "yes" if value is not None and value >= goal else "no"
        print(f"{what:<42} {shown} {goal:>7g}  {met}")


if __name__ == "__main__":
    main()
