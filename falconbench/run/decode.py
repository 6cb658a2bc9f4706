"""Fixed-length generation, timed: one prefill forward over the prompt, then one forward per new token.

A manual loop over the model's own cache instead of `generate`: no early stop, no sampling, no logits
processors, so every configuration does exactly the same work and each step can be timed between two
synchronizations (optimum-benchmark measures per-token latency the same way).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Protocol


class PhaseTracker(Protocol):
    def synchronize(self) -> None: ...
    def begin(self, phase: str) -> None: ...
    def end(self, phase: str) -> None: ...


@dataclass
class Generation:
    """One timed generation: time to first token, the decode steps' seconds, and the cache it left."""

    ttft_seconds: float
    step_seconds: list[float]
    cache: Any
    tokens: Any  # the generated token ids, batch × new_tokens


def prompt_ids(vocab_size: int, batch: int, tokens: int, seed: int, device: str):
    """A fixed random prompt (seeded), so every scheme sees the same tokens."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, tokens), generator=generator).to(device)


def input_device(model):
    """Where a model's inputs go: its parameters' device; under a device map whose first modules are offloaded
    (meta tensors behind accelerate's hooks, which move inputs themselves), a device that holds weights."""
    devices = [p.device for p in model.parameters() if p.device.type != "meta"]
    return devices[0] if devices else "cpu"


def cache_keyword(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache` (forward argument and output field); use whichever
    this version has."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _next_token(logits):
    return logits[:, -1:].argmax(dim=-1)


def generate_fixed(model, input_ids, new_tokens: int, tracker: PhaseTracker | None,
                   track: bool = True) -> Generation:
    """Prefill, then `new_tokens - 1` decode steps, greedy; memory phases tracked when `track`. Without a tracker
    nothing is synchronized or tracked (the quality measurement's greedy continuation, untimed)."""
    import torch

    keyword = cache_keyword(model)
    track = track and tracker is not None
    sync = tracker.synchronize if tracker is not None else (lambda: None)
    with torch.inference_mode():
        if track:
            tracker.begin("prefill")
        sync()
        start = time.perf_counter()
        # logits for the last position only, as `generate` asks for during prefill
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        token = _next_token(out.logits)
        sync()
        ttft = time.perf_counter() - start
        if track:
            tracker.end("prefill")
        cache, tokens, steps = getattr(out, keyword), [token], []
        if track:
            tracker.begin("decode")
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{keyword: cache})
            token = _next_token(out.logits)
            sync()
            steps.append(time.perf_counter() - start)
            returned = getattr(out, keyword, None)
            cache = cache if returned is None else returned
            tokens.append(token)
        if track:
            tracker.end("decode")
    return Generation(ttft, steps, cache, torch.cat(tokens, dim=1))
