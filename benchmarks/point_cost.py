"""The marginal cost of one more shape point inside a load: its own measured work plus what the matrix adds
(no process start, no reload). Goal: the extra is at most 0.5 s.

Runs the tests' tiny Llama (random weights, bf16, CPU) as one load of several prompt lengths, `--trials` times,
and times the gap between consecutive points' rows as the parent receives them: the gap is one point's whole cost
inside the load; its own measured work (warmup + repeats × its prefill and decode, from its row) is subtracted.

    python benchmarks/point_cost.py
    python benchmarks/point_cost.py --trials 5 --points 8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "tie_word_embeddings": False, "initializer_range": 0.02,
}


def sweep(model: Path, prompts: tuple[int, ...], repeats: int, warmup: int) -> list[tuple[float, float]]:
    """(seconds since the previous point's row arrived, this point's own measured work) for every point but the
    first."""
    from falconbench.run import RunSettings, run_benchmark

    arrived: list[tuple[float, object]] = []
    settings = RunSettings(model=str(model), dtypes=("bf16",), prompt_tokens=prompts, new_tokens=(8,),
                           device="cpu", output=Path(tempfile.mkdtemp(prefix="point-cost-")) / "out",
                           random_weights=True, repeats=repeats, warmup=warmup)
    run_benchmark(settings, on_event=lambda e: e.kind == "done" and arrived.append((time.perf_counter(), e.row)))
    return [(later - earlier, point_work(row, repeats, warmup))
            for (earlier, _), (later, row) in zip(arrived, arrived[1:])]


def point_work(row, repeats: int, warmup: int) -> float:
    """The point's own measured generation time: every warmup and timed run at its median length."""
    return (repeats + warmup) * row.latency["generate_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--points", default="8,16,32,64", help="prompt lengths of the load's points")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = Path(tempfile.mkdtemp(prefix="tiny-llama-"))
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    prompts = tuple(int(p) for p in args.points.split(","))
    gaps = [gap for _ in range(args.trials) for gap in sweep(model, prompts, args.repeats, args.warmup)]
    rest = [seconds - work for seconds, work in gaps]
    print(f"{len(gaps)} points after the first of a load ({args.trials} trials of prompts {args.points}): each took "
          f"{statistics.median(s for s, _ in gaps):.3f} s (median), of which its measured work "
          f"{statistics.median(w for _, w in gaps):.3f} s; the rest {statistics.median(rest):+.3f} s median, "
          f"{min(rest):+.3f} to {max(rest):+.3f} (goal: at most +0.5 s)")


if __name__ == "__main__":
    main()
