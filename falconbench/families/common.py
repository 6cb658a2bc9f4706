"""Pieces the family readers share: norms, attention projections, per-layer kinds counted without enumerating."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable

from ..errors import ConfigError
from ..spec import CacheLayout, Fields, Linear

# Enumerate at most this many layers; past it, a layer kind must repeat with a period (see `count_layers`).
ENUMERATE_LIMIT = 1 << 16


def read_core(f: Fields, hidden: tuple[str, ...] = ("hidden_size",), heads: tuple[str, ...] = ("num_attention_heads",),
              layers: tuple[str, ...] = ("num_hidden_layers",), extra: tuple[str, ...] = ()) -> list[int]:
    """[hidden, heads, layers, vocab, *extra]: each family's spelling of the required widths, the missing ones
    named together, and the heads checked against the width."""
    values = [f.need(*hidden), f.need(*heads), f.need(*layers), f.need("vocab_size")] + [f.need(e) for e in extra]
    f.check()
    f.head_dim(values[0], values[1], field=None)
    return values


def layernorm(width: int, bias: bool = True) -> int:
    """Parameters of a LayerNorm (weight and bias) or, with bias=False, of an RMSNorm (weight only)."""
    return width * (2 if bias else 1)


def qkvo(hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool = False, out_bias: bool | None = None,
         out_name: str = "self_attn.o_proj") -> tuple[Linear, ...]:
    """Separate q, k, v projections and the output projection (Llama and most of its descendants)."""
    return (
        Linear("self_attn.q_proj", hidden, heads * head_dim, bias),
        Linear("self_attn.k_proj", hidden, kv_heads * head_dim, bias),
        Linear("self_attn.v_proj", hidden, kv_heads * head_dim, bias),
        Linear(out_name, heads * head_dim, hidden, bias if out_bias is None else out_bias),
    )


def gated_mlp(hidden: int, inter: int, bias: bool = False, prefix: str = "mlp") -> tuple[Linear, ...]:
    """SwiGLU/GeGLU: gate and up projections, then down."""
    return (Linear(f"{prefix}.gate_proj", hidden, inter, bias), Linear(f"{prefix}.up_proj", hidden, inter, bias),
            Linear(f"{prefix}.down_proj", inter, hidden, bias))


def attention_cache(kind: str, kv_heads: int, head_dim: int, window: int | None) -> CacheLayout:
    """K and V of `kv_heads` heads of `head_dim` per token; a window for sliding layers."""
    width = kv_heads * head_dim
    return CacheLayout(kind, width, width, window if kind == "sliding_attention" else None)


def count_layers(layers: int, kind_of: Callable[[int], Hashable], prefix: int = 0, period: int = 1) -> Counter:
    """How many of `layers` layers are of each kind, where `kind_of(i)` repeats with `period` after `prefix`.

    Enumerates at most prefix + period layers, so a config of 10^12 layers is counted as fast as one of 32.
    """
    prefix = min(prefix, layers)
    if prefix > ENUMERATE_LIMIT or period > ENUMERATE_LIMIT:
        raise ConfigError(f"{layers} layers with a per-layer pattern of {max(prefix, period)} entries is beyond "
                          "what falconbench lays out. Check num_hidden_layers and the per-layer lists")
    counts = Counter(kind_of(i) for i in range(prefix))
    rest = layers - prefix
    if rest:
        full_periods, remainder = divmod(rest, period)
        one_period = Counter(kind_of(prefix + j) for j in range(period))
        for kind, n in one_period.items():
            counts[kind] += n * full_periods
        counts.update(kind_of(prefix + full_periods * period + j) for j in range(remainder))
    return counts


def explicit_layer_types(f: Fields, layers: int) -> list[str] | None:
    """config.json's `layer_types`, checked against the layer count; None when absent."""
    types = f.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != layers:
        raise ConfigError(f"{f.source}: layer_types must list one type per layer ({layers}), got "
                          f"{len(types) if isinstance(types, list) else type(types).__name__}")
    known = {"full_attention", "sliding_attention"}
    unknown = sorted({str(t) for t in types} - known)
    if unknown:
        raise ConfigError(f"{f.source}: layer_types holds {', '.join(unknown)}, which this family's reader does not "
                          "know. Install torch and transformers to lay the model out from transformers itself")
    return types


def alternating(pattern: int) -> Callable[[int], str]:
    """Gemma 2/3, gpt-oss: every `pattern`-th layer is full attention, the rest slide."""
    return lambda i: "sliding_attention" if (i + 1) % pattern else "full_attention"


def sliding_window_or_none(f: Fields, default: int | None = None) -> int | None:
    """`sliding_window` as configured; 0 and null both mean none."""
    value = f.get("sliding_window", default=default)
    return None if value in (None, 0) else f.positive("sliding_window", value)
