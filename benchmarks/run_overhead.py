"""The runner's own overhead: one configuration's process, start to result, against its measured phases.

Runs one configuration through `falconbench.run.run_sweep` (a fresh spawned process, as `falconbench run`
does) and splits the wall time: process start and imports, loading, the timed generations, and the rest.

    python benchmarks/run_overhead.py                      # tiny Falcon, random weights, bf16, CPU
    python benchmarks/run_overhead.py --dtype nf4 --model ./my-model-folder
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    from falconbench.run import RunConfig, run_sweep
    from tiny_models import TINY_FALCON, write_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or profile (default: the tests' tiny Falcon, random weights)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--times", type=int, default=5, help="configurations measured (each a fresh process)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_config(Path(tmp) / "tiny-falcon", TINY_FALCON))
        config = RunConfig(model, args.dtype, device=args.device, random_weights=args.model is None
                           or not (Path(args.model) / "model.safetensors").exists(),
                           prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats)
        trials = []
        for trial in range(args.times):
            marks: list[tuple[str, float]] = []
            start = time.perf_counter()
            mark = lambda event: marks.append((event.phase or event.kind, time.perf_counter()))  # noqa: E731
            row = run_sweep([config], Path(tmp) / f"out-{trial}", mark)[0]
            trials.append((row, marks, start, time.perf_counter() - start))
    for row, marks, start, total in trials[:1]:
        report(row, marks, start, total)
    summarize(trials)


def summarize(trials) -> None:
    """Median and range over the trials of start-to-result, and of the part spent outside the measured phases."""
    import statistics

    totals = [total for _, _, _, total in trials]
    measured = [row.load_seconds + sum(row.latency["ttft_seconds"]["samples"])
                + sum(row.latency.get("decode_token_seconds", {}).get("samples", [])) for row, *_ in trials]
    outside = [t - m for t, m in zip(totals, measured)]
    imports = [dict(marks)["load"] - dict(marks)["start"] for _, marks, _, _ in trials]
    print(f"over {len(trials)} configurations: start to result median {statistics.median(totals):.3f} s "
          f"(min {min(totals):.3f}, max {max(totals):.3f}); outside the measured phases median "
          f"{statistics.median(outside):.3f} s (min {min(outside):.3f}, max {max(outside):.3f}), of which process "
          f"start and imports median {statistics.median(imports):.3f} s")


def report(row, marks, start: float, total: float) -> None:
    if row.status != "ok":
        sys.exit(f"the configuration failed ({row.status}): {row.error}")
    latency = row.latency
    generations = sum(latency["ttft_seconds"]["samples"]) + sum(latency.get("decode_token_seconds", {})
                                                                 .get("samples", []))
    measured = row.load_seconds + generations
    at = {name: moment - start for name, moment in marks}  # first time each message arrived
    warmup = 0.0
    if any(n.startswith("warmup") for n in at):
        first_warmup = min(t for n, t in at.items() if n.startswith("warmup"))
        warmup = min(t for n, t in at.items() if n.startswith("prefill")) - first_warmup
    overhead = total - measured - warmup
    print(f"model {row.model}, {row.dtype} on {row.device}, {row.settings['prompt_tokens']} + "
          f"{row.settings['new_tokens']} tokens, {row.settings['repeats']} repeats + {row.settings['warmup']} warmup")
    print("phase messages (seconds after the sweep started):")
    for name, moment in marks:
        print(f"  {moment - start:8.3f}  {name}")
    print(f"start to result:          {total:8.3f} s")
    print(f"measured phases:          {measured:8.3f} s  (load {row.load_seconds:.3f} s + timed generations "
          f"{generations:.3f} s)")
    print(f"warmup (asked for):       {warmup:8.3f} s")
    print(f"overhead:                 {overhead:8.3f} s  ({overhead / total:.0%} of the total)")
    imports = at["load"] - at["start"]
    libraries = "torch, transformers" + (", bitsandbytes" if row.settings["quantization"] else "")
    print(f"  of which start+imports: {imports:8.3f} s  (spawn, interpreter, {libraries})")


if __name__ == "__main__":
    main()
