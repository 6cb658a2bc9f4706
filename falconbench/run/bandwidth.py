"""The memory-bandwidth bound of decoding, and the machine's copy bandwidth it is set against.

A decode step reads every weight once and each sequence's KV cache once, and produces one token per sequence,
so `batch × bandwidth ÷ (weights + KV)` tokens per second is the most any kernel can reach (the roofline of a
memory-bound step; Williams et al. 2009). The bandwidth is measured: a torch copy between two buffers larger than
any cache, repeated, median, counted as STREAM counts a copy (bytes read + bytes written).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

COPY_BYTES = 256 * 2**20  # per buffer: well past the last-level cache of current CPUs
COPY_REPEATS = 7


def decode_bound_tokens_per_second(bandwidth_bytes_per_second: float, weights_bytes: int, kv_cache_bytes: int,
                                   batch: int = 1) -> float:
    """Tokens per second if a decode step took only the time to read the weights and the whole batch's cache."""
    return batch * bandwidth_bytes_per_second / (weights_bytes + kv_cache_bytes)


def decode_kv_bytes(kv_cache_bytes: int, cached_tokens: int, prompt_tokens: int) -> int:
    """The cache a decode step reads on average: its size halfway between the prompt and the last step (the
    cache grows by the same bytes per token)."""
    if cached_tokens <= 0:
        return kv_cache_bytes
    return kv_cache_bytes * (prompt_tokens + cached_tokens) // (2 * cached_tokens)


def measure_copy_bandwidth(device: str, size_bytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> dict[str, Any]:
    """Copy bandwidth of `device`'s memory (torch `copy_` of `size_bytes`, after one warm-up copy), median of
    `repeats`, in bytes per second (read + written)."""
    import torch

    source = torch.ones(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = []
    for number in range(repeats + 1):
        synchronize()
        start = time.perf_counter()
        target.copy_(source)
        synchronize()
        if number:  # the first copy faults the target's pages in
            samples.append(time.perf_counter() - start)
    del source, target
    seconds = statistics.median(samples)
    return {"bytes_per_second": 2 * size_bytes / seconds, "device": device,
            "method": f"torch copy_ of {size_bytes // 2**20} MiB, median of {repeats} (read + written bytes)",
            "samples_seconds": samples}
