"""What autograd saves for backward, counted tensor by tensor through `torch.autograd.graph.saved_tensors_hooks`.

Each saved tensor is put in one category: a parameter (not counted: the weights are counted as weights), a weight
copy (mixed precision's 16-bit copy of a weight, which autograd saves transposed for the input's gradient), or
the category of the code that saved it: "activation" for the model's forward, "logits" for the loss after it. Storages count once
while alive: a finalizer on each saved tensor takes its bytes off when autograd lets go of it, so the peak of
what a backward recomputes (gradient checkpointing) is measured, not summed.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator

CATEGORIES = ("activation", "logits", "weight_copy")


class SavedTensorLedger:
    """Live bytes of saved tensors per category, and the peak of those saved while `recording` is set."""

    def __init__(self, model: Any, copy_dtype: Any = None):
        self.copy_dtype = copy_dtype
        self.current = "activation"
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.param_storages |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.weight_shapes = {tuple(p.shape[::-1]) for p in model.parameters() if p.dim() == 2}
        self.live: dict[int, list] = {}  # storage pointer -> [references, bytes, category, phase]
        self.phase = "forward"
        self.backward_live = 0
        self.backward_peak = 0

    def category(self, tensor: Any) -> str:
        if (self.copy_dtype is not None and tensor.dim() == 2 and tensor.dtype == self.copy_dtype
                and not tensor.is_contiguous() and tuple(tensor.shape) in self.weight_shapes):
            return "weight_copy"
        return self.current

    @contextmanager
    def saving_as(self, category: str) -> Iterator[None]:
        """Tensors saved inside are of `category` (e.g. "logits" around the loss)."""
        previous, self.current = self.current, category
        try:
            yield
        finally:
            self.current = previous

    def pack(self, tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.param_storages or not storage.nbytes():
            return tensor
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [0, storage.nbytes(), self.category(tensor), self.phase]
            if self.phase == "backward":
                self.backward_live += entry[1]
                self.backward_peak = max(self.backward_peak, self.backward_live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)
        return tensor

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            del self.live[key]
            if entry[3] == "backward":
                self.backward_live -= entry[1]

    def bytes_by_category(self) -> dict[str, int]:
        """Live bytes saved in the forward, per category."""
        totals = dict.fromkeys(CATEGORIES, 0)
        for _, size, category, phase in self.live.values():
            if phase == "forward":
                totals[category] += size
        return totals

    @contextmanager
    def recording(self, phase: str) -> Iterator["SavedTensorLedger"]:
        import torch

        self.phase = phase
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield self
