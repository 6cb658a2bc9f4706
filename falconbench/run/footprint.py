"""Exact bytes of what a loaded model holds: weights (with bitsandbytes' side state) and the KV cache.

Tensors are counted once per storage, so tied weights (an output head sharing the embedding) and views count
once, as they occupy memory once.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator


def tensor_bytes(tensors: Iterable[Any], offloaded: bool = False) -> int:
    """Bytes of the distinct storages behind `tensors` (None entries skipped). With `offloaded`, a meta tensor is a
    weight accelerate keeps elsewhere (CPU memory or disk, read at each forward): its elements × width count."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type == "meta":
            if not offloaded:
                raise ValueError("a tensor is still on the meta device; the model was not fully materialized")
            seen[("meta", id(tensor))] = tensor.numel() * tensor.element_size()
            continue
        storage = tensor.untyped_storage()
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
    """Exact bytes of the loaded weights, deduplicated by storage, wherever a device map put them."""
    return tensor_bytes(model_tensors(model), offloaded=bool(getattr(model, "hf_device_map", None)))


def cache_layers(cache: Any) -> list[Any]:
    """The per-layer objects of a transformers cache (`cache.layers`; an encoder-decoder cache's self-attention
    and cross-attention layers; the older `key_cache`/`value_cache` lists; a legacy tuple of (key, value) pairs)."""
    if hasattr(cache, "self_attention_cache"):
        return cache_layers(cache.self_attention_cache) + cache_layers(cache.cross_attention_cache)
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return list(layers)
    if hasattr(cache, "key_cache"):
        return [list(pair) for pair in zip(cache.key_cache, cache.value_cache)]
    return [list(pair) for pair in cache]


def layer_tensors(layer: Any) -> Iterator[Any]:
    """Every tensor one cache layer holds: keys and values, a sliding layer's int64 window scalar, a linear-attention
    layer's `conv_states` and `recurrent_states` dicts, an indexed layer's indexer keys, whatever else it keeps."""
    if isinstance(layer, (list, tuple)):
        yield from layer
        return
    for value in vars(layer).values():
        if isinstance(value, dict):
            yield from value.values()
        elif hasattr(value, "untyped_storage"):
            yield value


def cache_tensors(cache: Any) -> Iterator[Any]:
    """Every tensor of every layer of a transformers cache."""
    for layer in cache_layers(cache):
        yield from layer_tensors(layer)


def cache_output(output: Any) -> Any:
    """The cache a model's forward returned: `cache` (transformers 5.2x's name), or `past_key_values` before it
    (reading the old name on a new output warns that it is deprecated)."""
    for name in ("cache", "past_key_values"):
        cache = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if cache is not None:
            return cache
    raise ValueError("the model's output holds no cache (was use_cache=True?)")


def kv_cache_bytes(cache: Any) -> int:
    """Exact bytes of every tensor the cache holds (K,V, window counters, convolution and recurrent states)."""
    return tensor_bytes(t for t in cache_tensors(cache) if t is not None and hasattr(t, "numel") and t.numel())


def cached_tokens(cache: Any) -> int:
    """Sequence length held by the cache's attention layers (0 for a cache of recurrent states only, which
    transformers refuses to give a length)."""
    try:
        return int(cache.get_seq_length())
    except ValueError:
        return 0
