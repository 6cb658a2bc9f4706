"""Llama-style decoders: Llama (and Falcon3, a Llama config), Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, StarCoder2.

Layouts follow transformers' `modeling_<type>.py`; which layers slide follows each config class's `layer_types`
default (or `sliding_window` alone, as `cache_utils.get_layer_types_and_kwargs` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..spec import ArchSpec, Fields, LayerGroup, Linear
from .common import (alternating, attention_cache, count_layers, explicit_layer_types, gated_mlp, layernorm, qkvo,
                     sliding_window_or_none)


@dataclass(frozen=True)
class Dims:
    """The widths every decoder reader reads first."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    inter: int


def read_dims(f: Fields, head_dim_default: int | None = None, inter: bool = True) -> Dims:
    hidden = f.need("hidden_size")
    heads = f.need("num_attention_heads")
    layers = f.need("num_hidden_layers")
    vocab = f.need("vocab_size")
    intermediate = f.need("intermediate_size") if inter else 0
    f.check()
    # No num_key_value_heads means multi-head attention (LLaMA-1 configs predate the field).
    kv_heads = f.int_or("num_key_value_heads", default=heads)
    head_dim = f.int_or("head_dim", default=head_dim_default) or f.head_dim(hidden, heads)
    return Dims(hidden, heads, kv_heads, head_dim, layers, vocab, intermediate)


def layer_kinds(f: Fields, layers: int, default: Callable[[int], str], prefix: int = 0,
                period: int = 1) -> dict[str, int]:
    """Layers per attention kind: config.json's `layer_types` if given, else the family's default rule."""
    explicit = explicit_layer_types(f, layers)
    if explicit is not None:
        return dict(count_layers(layers, explicit.__getitem__, prefix=layers))
    return dict(count_layers(layers, default, prefix=prefix, period=period))


def by_window(window: int | None) -> Callable[[int], str]:
    """Every layer slides when a window is configured (Mistral, Phi-3, StarCoder2, any Llama with one)."""
    return lambda i: "sliding_attention" if window else "full_attention"


def build(f: Fields, name: str, model_type: str, d: Dims, linears: tuple[Linear, ...], layer_float: int,
          kinds: dict[str, int], window: int | None, final_norm: int, tied: bool, head_bias: bool = False,
          embedding: int | None = None, max_positions: int | None = None) -> ArchSpec:
    """A uniform decoder whose layers differ only in what they cache."""
    groups = tuple(LayerGroup(n, linears, layer_float, (attention_cache(kind, d.kv_heads, d.head_dim, window),))
                   for kind, n in sorted(kinds.items()) if n)
    return ArchSpec(
        name=name, model_type=model_type, hidden_size=d.hidden, num_heads=d.heads, vocab_size=d.vocab,
        groups=groups, embedding_params=d.vocab * d.hidden if embedding is None else embedding,
        final_norm_params=final_norm, lm_head=None if tied else Linear("lm_head", d.hidden, d.vocab, head_bias),
        intermediate_size=d.inter, num_kv_heads=d.kv_heads, head_dim=d.head_dim,
        max_positions=max_positions or f.int_or("max_sequence_length", "max_position_embeddings", default=None),
    )


def llama(f: Fields, name: str, model_type: str) -> ArchSpec:
    """Llama 1-3, Falcon3, Mistral, and the Llama-shaped estimate of unknown types."""
    d = read_dims(f)
    attn_bias, mlp_bias = bool(f.get("attention_bias", default=False)), bool(f.get("mlp_bias", default=False))
    linears = qkvo(d.hidden, d.heads, d.kv_heads, d.head_dim, attn_bias) + gated_mlp(d.hidden, d.inter, mlp_bias)
    window = sliding_window_or_none(f)
    return build(f, name, model_type, d, linears, 2 * d.hidden, layer_kinds(f, d.layers, by_window(window)),
                 window, d.hidden, bool(f.get("tie_word_embeddings", default=False)))


def qwen(f: Fields, name: str, model_type: str) -> ArchSpec:
    """Qwen2 (q/k/v biases) and Qwen3 (no biases; per-head q/k RMSNorms; head_dim 128 by default)."""
    qwen3 = model_type == "qwen3"
    d = read_dims(f, head_dim_default=128 if qwen3 else None)
    bias = bool(f.get("attention_bias", default=False)) if qwen3 else True
    linears = qkvo(d.hidden, d.heads, d.kv_heads, d.head_dim, bias, out_bias=bias if qwen3 else False)
    linears += gated_mlp(d.hidden, d.inter)
    # Qwen2Config drops the window unless use_sliding_window, then slides layers from max_window_layers on.
    window = sliding_window_or_none(f) if f.get("use_sliding_window", default=False) else None
    start = f.int_or("max_window_layers", default=28)
    kinds = layer_kinds(f, d.layers, lambda i: "sliding_attention" if window and i >= start else "full_attention",
                        prefix=start)
    norms = 2 * d.hidden + (2 * d.head_dim if qwen3 else 0)
    return build(f, name, model_type, d, linears, norms, kinds, window, d.hidden,
                 bool(f.get("tie_word_embeddings", default=False)))


def gemma(f: Fields, name: str, model_type: str) -> ArchSpec:
    """Gemma 1 (2 norms), Gemma 2 (4 norms, alternating windows), Gemma 3 text (4 norms + q/k norms, 5:1)."""
    d = read_dims(f, head_dim_default=256)
    linears = qkvo(d.hidden, d.heads, d.kv_heads, d.head_dim, bool(f.get("attention_bias", default=False)))
    linears += gated_mlp(d.hidden, d.inter)
    if model_type == "gemma":
        window, kinds, norms = None, {"full_attention": d.layers}, 2 * d.hidden
    else:
        window = sliding_window_or_none(f, default=4096)
        pattern = 2 if model_type == "gemma2" else f.int_or("sliding_window_pattern", default=6)
        kinds = layer_kinds(f, d.layers, alternating(pattern), period=pattern)
        norms = 4 * d.hidden + (2 * d.head_dim if model_type == "gemma3_text" else 0)
    # NOTE: Gemma ties its output head to the embeddings; a config.json without the field still ties.
    return build(f, name, model_type, d, linears, norms, kinds, window, d.hidden,
                 bool(f.get("tie_word_embeddings", default=True)))


def phi3(f: Fields, name: str, model_type: str) -> ArchSpec:
    """Phi-3: fused qkv_proj and gate_up_proj."""
    d = read_dims(f)
    linears = (
        Linear("self_attn.qkv_proj", d.hidden, (d.heads + 2 * d.kv_heads) * d.head_dim),
        Linear("self_attn.o_proj", d.heads * d.head_dim, d.hidden),
        Linear("mlp.gate_up_proj", d.hidden, 2 * d.inter),
        Linear("mlp.down_proj", d.inter, d.hidden),
    )
    window = sliding_window_or_none(f)
    return build(f, name, model_type, d, linears, 2 * d.hidden, layer_kinds(f, d.layers, by_window(window)),
                 window, d.hidden, bool(f.get("tie_word_embeddings", default=False)))


def starcoder2(f: Fields, name: str, model_type: str) -> ArchSpec:
    """StarCoder2: biased projections, a two-matrix MLP (c_fc, c_proj), LayerNorms with bias."""
    d = read_dims(f)
    bias = bool(f.get("use_bias", default=True))
    linears = qkvo(d.hidden, d.heads, d.kv_heads, d.head_dim, bias)
    linears += (Linear("mlp.c_fc", d.hidden, d.inter, bias), Linear("mlp.c_proj", d.inter, d.hidden, bias))
    window = sliding_window_or_none(f)
    return build(f, name, model_type, d, linears, 2 * layernorm(d.hidden, bias),
                 layer_kinds(f, d.layers, by_window(window)), window, layernorm(d.hidden, bias),
                 bool(f.get("tie_word_embeddings", default=True)))


def phi(f: Fields, name: str, model_type: str) -> ArchSpec:
    """Phi-1/1.5/2: biased projections, a two-matrix MLP (fc1, fc2), one LayerNorm per layer, a biased head."""
    d = read_dims(f)
    linears = qkvo(d.hidden, d.heads, d.kv_heads, d.head_dim, True, out_name="self_attn.dense")
    linears += (Linear("mlp.fc1", d.hidden, d.inter, True), Linear("mlp.fc2", d.inter, d.hidden, True))
    qk_norms = 2 * layernorm(d.head_dim) if f.get("qk_layernorm", default=False) else 0
    return build(f, name, model_type, d, linears, layernorm(d.hidden) + qk_norms, {"full_attention": d.layers},
                 None, layernorm(d.hidden), bool(f.get("tie_word_embeddings", default=False)), head_bias=True)


READERS = {
    "llama": llama, "mistral": llama,
    "qwen2": qwen, "qwen3": qwen,
    "gemma": gemma, "gemma2": gemma, "gemma3_text": gemma,
    "phi3": phi3, "starcoder2": starcoder2, "phi": phi,
}
