"""How long fine-tuning takes to plan and to measure: a planned training sweep, a fit search, one measured step.

Run: python benchmarks/finetune_sweep.py [--model falcon-7b] [--repeats 5] [--measure smollm2] [--seq-len 128]
Prints medians and spreads; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import product


def timed(work, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return times


def planned_sweep(model: str, repeats: int) -> tuple[int, list[float]]:
    """Every method × optimizer × rank × sequence length × batch × checkpointing of one model, in process."""
    from falconbench.finetune import DEFAULT_DTYPE, OPTIMIZERS, FinetuneSetup, plan_finetune_point
    from falconbench.sources import resolve_model

    spec = resolve_model(model).spec()
    setups = [FinetuneSetup(method, DEFAULT_DTYPE[method], r, None, seq, batch, optimizer, ckpt)
              for method, optimizer, r, seq, batch, ckpt in product(
                  ("lora", "qlora", "full"), OPTIMIZERS, (8, 16, 64), (512, 2048, 8192), (1, 4, 16), (False, True))]
    return len(setups), timed(lambda: [plan_finetune_point(spec, s) for s in setups], repeats)


def fit_search(model: str, repeats: int) -> list[float]:
    """`fit --task finetune` for qlora and lora on every GPU profile (each cell searches sequence and batch)."""
    from falconbench.finetune import FinetuneSetup
    from falconbench.finetune_fit import fit_finetune

    setups = [FinetuneSetup("qlora", gradient_checkpointing=True), FinetuneSetup("lora")]
    return timed(lambda: fit_finetune(model, setups), repeats)


def measured_step(model: str, seq_len: int) -> dict:
    """One warmup and one timed training step of lora on a real model, in its own process (as `run` does)."""
    from falconbench.data import EVAL_TEXT
    from falconbench.finetune import FinetuneSetup
    from falconbench.run.orchestrator import zoo_folder
    from falconbench.sources import resolve_model
    from falconbench.train.measure import StepSettings
    from falconbench.train.worker import run_isolated

    folder = resolve_model(zoo_folder(model)).folder
    start = time.perf_counter()
    message = run_isolated(folder, FinetuneSetup("lora", seq_len=seq_len), StepSettings(steps=1, warmup=1),
                           EVAL_TEXT)
    fields = message["fields"]
    return {"status": message["status"], "error": message["error"], "process_seconds": time.perf_counter() - start,
            "step_seconds": fields.get("seconds_per_step"), "tokens_per_second": fields.get("tokens_per_second")}


def spread(times: list[float]) -> str:
    return (f"median {statistics.median(times) * 1000:,.2f} ms (min {min(times) * 1000:,.2f}, "
            f"max {max(times) * 1000:,.2f}, n={len(times)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="falcon-7b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--measure", default="smollm2", help="the real model one step is measured on")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    count, times = planned_sweep(args.model, args.repeats)
    print(f"planned training sweep, {count:,} setups of {args.model}: {spread(times)}")
    print(f"fit --task finetune, 2 setups x every GPU: {spread(fit_search(args.model, args.repeats))}")
    step = measured_step(args.measure, args.seq_len)
    if step["status"] != "ok":
        print(f"measured step on {args.measure}: {step['status']}: {step['error']}")
        return
    print(f"measured lora step on {args.measure}, seq {args.seq_len}: {step['step_seconds']:.3f} s/step, "
          f"{step['tokens_per_second']:,.0f} tokens/s; the whole isolated process {step['process_seconds']:.1f} s")


if __name__ == "__main__":
    main()
