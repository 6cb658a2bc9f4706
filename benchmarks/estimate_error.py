"""The planner's error per runtime component, against the exact peak of live tensors in a real prefill.

For each shape (prompt tokens × batch) and compute dtype, builds the model from its config.json with random
weights (the shapes are what matter), warms it, then counts every tensor one prefill allocates
(falconbench/run/live_tensors.py) with sdpa and with eager attention, and prints beside the planner:
- activations: the sdpa prefill's peak beyond the KV cache and the returned logits, against `activation_bytes`;
- eager: the eager prefill's peak beyond the KV cache and the logits, against the plan's activations + scores
  (`attention_scores_bytes`: its score matrix, softmax and mask; the plan adds the two, which are not all alive at
  once, so it is an upper bound by the smaller of them);
- logits: the returned logits' bytes (`logits_to_keep=1`, as generate's prefill asks), against `logits_bytes`
  (generate then copies them to float32: the planner counts that copy).
Error = (planned − measured) / measured: positive means the planner is safe (over), negative it is short.

    python benchmarks/estimate_error.py                      # SmolLM2-135M's architecture, bf16 and fp32
    python benchmarks/estimate_error.py --config tests/data/... --tokens 128,512 --batch 1,4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from falconbench.planner import plan_point  # noqa: E402
from falconbench.schemes import SCHEMES  # noqa: E402
from falconbench.sources import resolve_model  # noqa: E402

DEFAULT_CONFIG = ROOT / "falconbench" / "data" / "zoo" / "smollm2.json"


def measure(config_path: Path, dtype: str, attn: str, tokens: int, batch: int) -> tuple[int, int, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from falconbench.run.live_tensors import prefill_peak

    hf = AutoConfig.from_pretrained(config_path.parent if config_path.name == "config.json" else config_path)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch_dtype, attn_implementation=attn).eval()
    ids = torch.randint(0, hf.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids[:, :8], use_cache=True, logits_to_keep=1)  # first-call allocations aside
    return prefill_peak(model, ids)


def percent(planned: int, measured: int) -> str:
    return f"{(planned - measured) / measured:+.1%}" if measured else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a config.json (or a folder with one)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--tokens", default="128,512,2048")
    parser.add_argument("--batch", default="1,4")
    args = parser.parse_args(argv)
    spec = resolve_model(str(args.config)).spec()
    print(f"{spec.name}: planner against live tensors in one prefill (MiB; error = (planned − measured) / measured)")
    print(f"{'dtype':5} {'tokens':>6} {'batch':>5} | {'activ. meas':>11} {'plan':>8} {'error':>7} | "
          f"{'eager meas':>11} {'plan':>8} {'error':>7} | {'logits meas':>11} {'plan':>6}")
    mib = 2**20
    for dtype in args.dtypes.split(","):
        for tokens in map(int, args.tokens.split(",")):
            for batch in map(int, args.batch.split(",")):
                sdpa, _, logits = measure(args.config, dtype, "sdpa", tokens, batch)
                eager, _, _ = measure(args.config, dtype, "eager", tokens, batch)
                plan = plan_point(spec, SCHEMES[dtype], tokens, batch, attn_impl="eager", device="cpu")
                eager_plan = plan.activation_bytes + plan.attention_scores_bytes
                print(f"{dtype:5} {tokens:>6} {batch:>5} | {sdpa / mib:>11.1f} {plan.activation_bytes / mib:>8.1f} "
                      f"{percent(plan.activation_bytes, sdpa):>7} | {eager / mib:>11.1f} "
                      f"{eager_plan / mib:>8.1f} {percent(eager_plan, eager):>7} | "
                      f"{logits / mib:>11.2f} {plan.logits_bytes / mib:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
