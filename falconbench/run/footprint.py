"""Exact bytes of what a loaded model holds: weights (with bitsandbytes' side state) and the KV cache.

Tensors are counted once per storage, so tied weights (an output head sharing the embedding) and views count
once, as they occupy memory once.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind `tensors` (None entries skipped)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        if tensor.device.type == "meta":
            raise ValueError("a tensor is still on the meta device; the model was not fully materialized")
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _quant_state_tensors(state: Any) -> Iterator[Any]:
    """absmax, code and offset of a bitsandbytes QuantState, and its nested state2 (double quantization)."""
    while state is not None:
        yield getattr(state, "absmax", None)
        yield getattr(state, "code", None)
        yield getattr(state, "offset", None)
        state = getattr(state, "state2", None)


def bnb_state_tensors(module: Any) -> Iterator[Any]:
    """Tensors bitsandbytes keeps outside parameters and buffers.

    Linear8bitLt: the row scales `SCB` live on `weight.SCB` until the first forward, then in `module.state`
    (bitsandbytes' `init_8bit_state`). Linear4bit: the weight's QuantState holds absmax, the codebook and, with
    double quantization, the nested state.
    """
    weight = getattr(module, "weight", None)
    state = getattr(module, "state", None)
    for holder in (weight, state):
        for name in ("CB", "SCB"):
            yield getattr(holder, name, None)
    yield from _quant_state_tensors(getattr(weight, "quant_state", None))


def model_tensors(model: Any) -> Iterator[Any]:
    """Every tensor the model holds: parameters, buffers, bitsandbytes state."""
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        yield from bnb_state_tensors(module)


def weights_bytes(model: Any) -> int:
    """Exact bytes of the loaded weights, deduplicated by storage."""
    return tensor_bytes(model_tensors(model))


def cache_tensors(cache: Any) -> Iterator[Any]:
    """Key and value tensors of a transformers cache: `layers[i].keys/values` (transformers ≥ 4.56), or the
    older `key_cache`/`value_cache` lists, or a legacy tuple of (key, value) pairs."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            yield getattr(layer, "keys", None)
            yield getattr(layer, "values", None)
    elif hasattr(cache, "key_cache"):
        yield from cache.key_cache
        yield from cache.value_cache
    else:
        for pair in cache:
            yield from pair


def kv_cache_bytes(cache: Any) -> int:
    """Exact bytes of the K,V tensors the cache holds."""
    return tensor_bytes(t for t in cache_tensors(cache) if t is not None and t.numel())


def cached_tokens(cache: Any) -> int:
    """Sequence length held by the cache."""
    return int(cache.get_seq_length())
