"""How fast the planner is: a whole `falconbench plan` process, and a large in-process sweep.

Run: python benchmarks/plan_sweep.py [--points 100000] [--repeats 5]
Prints the median and spread of each figure; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def process_seconds(repeats: int) -> list[float]:
    """Wall time of `python -m falconbench plan` (the seed table), start to exit."""
    times = []
    for _ in range(repeats + 1):  # the first run warms the file cache and is dropped
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "falconbench", "plan", "--format", "json"], check=True,
                       capture_output=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def sweep_seconds(points: int, repeats: int) -> tuple[int, list[float]]:
    """Time to plan `points` (model, dtype, context, batch) points in process, profiles parsed once."""
    from falconbench import get_scheme, resolve_model
    from falconbench.planner import plan_point
    from falconbench.schemes import SCHEMES
    from falconbench.sources import model_profiles

    specs = [resolve_model(m).spec() for m in model_profiles()]
    schemes = [get_scheme(s) for s in SCHEMES]
    per_pair = max(1, points // (len(specs) * len(schemes)))
    contexts = [512 * (i + 1) for i in range(per_pair)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = 0
        for spec in specs:
            for scheme in schemes:
                for context in contexts:
                    plan_point(spec, scheme, context, 1)
                    count += 1
        times.append(time.perf_counter() - start)
    return count, times


def describe(times: list[float]) -> str:
    median = statistics.median(times)
    return f"median {median:.3f} s (min {min(times):.3f}, max {max(times):.3f}, n={len(times)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"falconbench plan process (seed table): {describe(process_seconds(args.repeats))}")
    count, times = sweep_seconds(args.points, max(1, args.repeats // 2))
    median = statistics.median(times)
    print(f"in-process sweep of {count:,} plan points: {describe(times)}, {count / median:,.0f} points/s")


if __name__ == "__main__":
    main()
