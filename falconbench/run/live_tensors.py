"""The peak of live tensor storage while a piece of torch code runs: every tensor an operator returns is counted
(its storage's bytes, released when the storage is freed), so the figure is exact and independent of the
allocator, unlike resident memory or a CUDA allocator's reserved bytes. The planner's estimates are checked
against it (tests/test_estimates.py, benchmarks/estimate_error.py)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .footprint import cache_output, kv_cache_bytes


class LiveTensorPeak(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while the mode is on (tensors that existed before it are
    not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.seen:
                    self.seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self.seen.discard(key)


def prefill_peak(model, input_ids, logits_to_keep: int = 1) -> tuple[int, int, int]:
    """One prefill of `model` (already warm): (live peak beyond the KV cache and the logits it returns, the KV
    cache's bytes, the logits' bytes)."""
    with torch.inference_mode():
        peak = LiveTensorPeak()
        with peak:
            out = model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep)
        kv = kv_cache_bytes(cache_output(out))
        logits = out.logits.untyped_storage().nbytes()
    return peak.peak - kv - logits, kv, logits
