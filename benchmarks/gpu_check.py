"""Full-size Falcon-7B (random weights) on one CUDA GPU: the run matrix, bf16, fp16, int8 and nf4 × prompt 512
and 4096 × batch 1 and 8, the plan against the measurement at every point (weights, KV cache, each runtime
estimate, the bandwidth bound), phase by phase. About 10 minutes on an H100/H200-class card.

Needs a CUDA GPU with torch, transformers, accelerate and bitsandbytes; about 16 GiB of GPU memory for bf16 at
batch 1. Each load (scheme) runs in its own process through `falconbench run`'s machinery, its shape points
inside it; rows land in --output (default: a new folder under reports/, so the check can run again). Runs from a
checkout without installing falconbench. `--dry-run` runs the same script on CPU on a tiny Falcon built from a
config (no GPU, seconds), which is how the tests check it.

    python benchmarks/gpu_check.py                       # falcon-7b, the full matrix
    python benchmarks/gpu_check.py --model falcon-40b --dtype int8,nf4 --batch 1
    python benchmarks/gpu_check.py --dry-run --dtype bf16 --output /tmp/gpu-check-dry
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# NOTE: the checkout's package first, so a GPU machine needs no install (the spawned workers inherit sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The dry run's model: the tests' tiny multi-query Falcon (every layer's outputs a multiple of 32, as
# bitsandbytes' CPU 4-bit kernel needs).
TINY_FALCON = {
    "model_type": "falcon", "architectures": ["FalconForCausalLM"], "vocab_size": 256, "hidden_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "new_decoder_architecture": False, "multi_query": True,
    "parallel_attn": True, "bias": False, "ffn_hidden_size": 512, "max_position_embeddings": 256,
    "tie_word_embeddings": True, "initializer_range": 0.02,
}


def require_cuda() -> None:
    """Exit with a clear message where this check cannot run."""
    try:
        import torch
    except ImportError:
        sys.exit("gpu_check: torch is not installed. pip install torch (a CUDA build) and falconbench[run]")
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; this check runs full-size models on "
                 "one. Run it on a GPU machine, or try the script with --dry-run")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        sys.exit("gpu_check: bitsandbytes is not installed; int8 and nf4 need it. pip install 'bitsandbytes>=0.45'")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="falcon-7b")
    parser.add_argument("--dtype", default="bf16,fp16,int8,nf4")
    parser.add_argument("--prompt-tokens", default="512,4096")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="default: a new folder under reports/")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same matrix machinery on CPU, on a tiny Falcon, prompt 8,16 × batch 1,2")
    return parser.parse_args()


def numbers(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(","))


def main() -> None:
    args = arguments()
    device, model = "cuda", args.model
    prompts, batches, new_tokens, repeats = numbers(args.prompt_tokens), numbers(args.batch), args.new_tokens, \
        args.repeats
    if args.dry_run:
        folder = Path(tempfile.mkdtemp(prefix="gpu-check-dry-"))
        (folder / "config.json").write_text(json.dumps(TINY_FALCON))
        device, model, prompts, batches, new_tokens, repeats = "cpu", str(folder), (8, 16), (1, 2), 4, 1
    else:
        require_cuda()
    from falconbench.errors import FalconbenchError
    from falconbench.run import RunSettings, run_benchmark

    settings = RunSettings(model=model, dtypes=tuple(args.dtype.split(",")), attns=tuple(args.attn.split(",")),
                           prompt_tokens=prompts, new_tokens=(new_tokens,), batches=batches, device=device,
                           output=args.output, random_weights=True, repeats=repeats)
    started = time.perf_counter()
    try:
        outcome = run_benchmark(settings, on_event=lambda e: e.kind == "done" and print(
            f"{e.config.dtype} {e.config.attn_impl} prompt {e.config.prompt_tokens} batch {e.config.batch}: "
            f"{e.row.status} {e.row.error or ''}", flush=True))
    except FalconbenchError as error:
        sys.exit(f"gpu_check: {error}")
    print(f"\nthe matrix took {time.perf_counter() - started:.1f} s ({len(outcome.rows)} points)")
    print_comparison(outcome)
    print(f"rows: {outcome.results_path}")


def print_comparison(outcome) -> None:
    """The run's own tables (plan against measured, per component), then each point's phases."""
    from falconbench.planner import CUDA_CONTEXT_BYTES
    from falconbench.render.console import format_bytes
    from falconbench.render.report import print_comparison as tables
    from falconbench.report import load_comparison

    rows = outcome.rows
    env = rows[0].environment if rows else {}
    print(f"\n{rows[0].model if rows else ''} on {env.get('gpu') or env.get('cpu')} (driver {env.get('driver')}, "
          f"CUDA {env.get('cuda')}), torch {env.get('torch')}, transformers {env.get('transformers')}, "
          f"bitsandbytes {env.get('bitsandbytes')}")
    tables(load_comparison([outcome.output_dir]))
    for r in rows:
        s = r.settings
        context = r.memory.get("cuda_context_bytes")
        print(f"{r.dtype} prompt {s.get('prompt_tokens')} batch {s.get('batch')}: {r.status}; CUDA context "
              f"{format_bytes(context)} (plan {format_bytes(CUDA_CONTEXT_BYTES)})")
        for phase, figures in r.memory.get("phases", {}).items():
            print(f"    {phase:8s} " + ", ".join(f"{k} {format_bytes(v)}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
