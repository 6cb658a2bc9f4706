"""Full-size Falcon-7B (random weights) in bf16, fp16, int8 and nf4 on one CUDA GPU: the plan against the
measurement, for every scheme.

Needs a CUDA GPU with torch, transformers, accelerate and bitsandbytes; about 16 GiB of GPU memory for bf16.
Each scheme runs in its own process through `falconbench run`'s machinery; rows land in --output (default: a
new folder under reports/, so the check can run again). Runs from a checkout without installing falconbench.

    python benchmarks/gpu_check.py                       # falcon-7b, 512 + 64 tokens
    python benchmarks/gpu_check.py --model falcon-40b --dtype int8,nf4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# NOTE: the checkout's package first, so a GPU machine needs no install (the spawned workers inherit sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def require_cuda() -> None:
    """Exit with a clear message where this check cannot run."""
    try:
        import torch
    except ImportError:
        sys.exit("gpu_check: torch is not installed. pip install torch (a CUDA build) and falconbench[run]")
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; this check runs full-size models on "
                 "one. Run it on a GPU machine (CPU runs: falconbench run --device cpu)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        sys.exit("gpu_check: bitsandbytes is not installed; int8 and nf4 need it. pip install 'bitsandbytes>=0.45'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="falcon-7b")
    parser.add_argument("--dtype", default="bf16,fp16,int8,nf4")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="default: a new folder under reports/")
    args = parser.parse_args()
    require_cuda()
    from falconbench.errors import FalconbenchError
    from falconbench.run import run_benchmark

    try:
        outcome = run_benchmark(args.model, args.dtype.split(","), device="cuda", output=args.output,
                                random_weights=True, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                repeats=args.repeats, on_event=lambda e: e.kind == "done" and print(
                                    f"{e.config.dtype}: {e.row.status} {e.row.error or ''}", flush=True))
    except FalconbenchError as error:
        sys.exit(f"gpu_check: {error}")
    print_comparison(outcome.rows)
    print(f"rows: {outcome.results_path}")


def print_comparison(rows) -> None:
    from falconbench.planner import CUDA_CONTEXT_BYTES
    from falconbench.render.console import format_bytes, versus_plan

    env = rows[0].environment if rows else {}
    print(f"\n{rows[0].model if rows else ''} on {env.get('gpu')} (driver {env.get('driver')}, "
          f"CUDA {env.get('cuda')}), "
          f"torch {env.get('torch')}, transformers {env.get('transformers')}, bitsandbytes {env.get('bitsandbytes')}")
    header = ("dtype", "status", "quant", "weights", "plan", "Δplan", "kv", "plan", "Δplan", "peak (NVML)",
              "plan total", "Δplan", "ctx", "ttft", "tok/s")
    print(" | ".join(header))
    for r in rows:
        context = r.memory.get("cuda_context_bytes")
        cells = (r.dtype, r.status, f"{r.quantized_layers}/{r.linear_layers}", format_bytes(r.weights_bytes),
                 format_bytes(r.planned_weights_bytes),
                 versus_plan(r.weights_bytes, r.planned_weights_bytes),
                 format_bytes(r.kv_cache_bytes), format_bytes(r.planned_kv_cache_bytes),
                 versus_plan(r.kv_cache_bytes, r.planned_kv_cache_bytes),
                 format_bytes(r.peak_memory_bytes), format_bytes(r.planned_total_bytes),
                 versus_plan(r.peak_memory_bytes, r.planned_total_bytes),
                 f"{format_bytes(context)} (plan {format_bytes(CUDA_CONTEXT_BYTES)})",
                 "-" if r.ttft_seconds is None else f"{r.ttft_seconds * 1000:.1f} ms",
                 "-" if r.decode_tokens_per_second is None else f"{r.decode_tokens_per_second:.1f}")
        print(" | ".join(map(str, cells)))
        for phase, figures in r.memory.get("phases", {}).items():
            print(f"    {phase:8s} " + ", ".join(f"{k} {format_bytes(v)}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
