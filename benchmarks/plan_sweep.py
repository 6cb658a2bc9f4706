"""How fast the planner is: a whole `falconbench plan` process (a hand-written family; a type only transformers
knows, first laid out on the meta device and then read from the layout cache), and a large in-process sweep.

Run: python benchmarks/plan_sweep.py [--points 100000] [--repeats 5] [--general-type cohere2]
Prints the median and spread of each figure; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def plan_process(args: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of one `python -m falconbench plan ...` process, start to exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "falconbench", "plan", "--format", "json", *args], check=True,
                   capture_output=True, env=env)
    return time.perf_counter() - start


def process_seconds(repeats: int, args: list[str] = (), env: dict[str, str] | None = None) -> list[float]:
    """Wall times of `repeats` plan processes; a first one warms the file cache and is dropped."""
    return [plan_process(list(args), env) for _ in range(repeats + 1)][1:]


def general_path_seconds(model_type: str, repeats: int) -> tuple[float, list[float]]:
    """A type no reader knows, from its default config in a fresh layout cache: the first plan (laid out on the
    meta device, torch imported) and the next ones (read from the cached layout)."""
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / model_type
        folder.mkdir()
        config = {**AutoConfig.for_model(model_type).to_dict(), "model_type": model_type}
        (folder / "config.json").write_text(json.dumps(config))
        env = {**os.environ, "FALCONBENCH_CACHE": str(Path(tmp) / "cache")}
        first = plan_process(["-m", str(folder)], env)
        return first, [plan_process(["-m", str(folder)], env) for _ in range(repeats)]


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
    parser.add_argument("--general-type", default="cohere2", help="a model type only transformers knows")
    args = parser.parse_args()
    print(f"falconbench plan process (seed table, hand-written readers): {describe(process_seconds(args.repeats))}")
    first, cached = general_path_seconds(args.general_type, args.repeats)
    print(f"falconbench plan process, {args.general_type} (general path): first, laid out on the meta device "
          f"{first:.3f} s; cached layout {describe(cached)}")
    count, times = sweep_seconds(args.points, max(1, args.repeats // 2))
    median = statistics.median(times)
    print(f"in-process sweep of {count:,} plan points: {describe(times)}, {count / median:,.0f} points/s")


if __name__ == "__main__":
    main()
