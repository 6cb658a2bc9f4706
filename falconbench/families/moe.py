"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3 (MLA), gpt-oss.

Layouts follow transformers 5's `modeling_<type>.py`: the routed experts are fused 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), the router is a plain parameter (not an nn.Linear), and
shared experts and dense layers are ordinary linears.
"""

from __future__ import annotations

from math import gcd

from ..spec import ArchSpec, CacheLayout, Experts, Fields, LayerGroup, Linear
from .common import alternating, attention_cache, count_layers, explicit_layer_types, gated_mlp, qkvo
from .common import sliding_window_or_none
from .decoders import Dims, read_dims


def routed(f: Fields, hidden: int, inter: int, experts: int, active_default: int, bias: bool = False,
           fused_since_v4: bool = False) -> Experts:
    """`experts` SwiGLU experts (gate and up fused into one 3-D parameter, then down), `num_experts_per_tok` of
    them active per token."""
    active = min(f.int_or("num_experts_per_tok", default=active_default), experts)
    return Experts("mlp.experts", experts, (Linear("gate_up_proj", hidden, 2 * inter, bias),
                                            Linear("down_proj", inter, hidden, bias)), fused_since_v4, active)


def assemble(f: Fields, name: str, model_type: str, d: Dims, counts: dict, parts: dict, head_tied: bool,
             max_positions: int | None = None) -> ArchSpec:
    """Groups from per-kind layer counts; `parts[kind]` gives (linears, float params, caches, experts, fp32)."""
    groups = tuple(LayerGroup(n, *parts[kind]) for kind, n in sorted(counts.items()) if n)
    return ArchSpec(
        name=name, model_type=model_type, hidden_size=d.hidden, num_heads=d.heads, vocab_size=d.vocab,
        groups=groups, embedding_params=d.vocab * d.hidden, final_norm_params=d.hidden,
        lm_head=None if head_tied else Linear("lm_head", d.hidden, d.vocab), intermediate_size=d.inter,
        num_kv_heads=d.kv_heads, head_dim=d.head_dim,
        max_positions=max_positions or f.int_or("max_position_embeddings", default=None),
    )


def mixtral(f: Fields, name: str, model_type: str) -> ArchSpec:
    d = read_dims(f)
    experts = f.need("num_local_experts")
    f.check()
    window = sliding_window_or_none(f)
    kind = "sliding_attention" if window else "full_attention"
    cache = (attention_cache(kind, d.kv_heads, d.head_dim, window),)
    parts = {kind: (qkvo(d.hidden, d.heads, d.kv_heads, d.head_dim), 2 * d.hidden + experts * d.hidden, cache,
                    (routed(f, d.hidden, d.inter, experts, 2),))}
    return assemble(f, name, model_type, d, {kind: d.layers}, parts, bool(f.get("tie_word_embeddings", default=False)))


def qwen_moe(f: Fields, name: str, model_type: str) -> ArchSpec:
    """Qwen2-MoE (q/k/v biases, a gated shared expert) and Qwen3-MoE (q/k norms, no shared expert)."""
    qwen3 = model_type == "qwen3_moe"
    d = read_dims(f)
    experts = f.count_or_zero("num_experts", "num_local_experts")
    moe_inter = f.int_or("moe_intermediate_size", default=768 if qwen3 else 1408)
    step = f.int_or("decoder_sparse_step", default=1)
    dense_only = set(f.int_list("mlp_only_layers"))
    use_window = bool(f.get("use_sliding_window", default=False))
    window = sliding_window_or_none(f, default=4096) if use_window else None
    last_window = f.int_or("max_window_layers", default=28)
    explicit = explicit_layer_types(f, d.layers)

    def kind_of(i: int) -> tuple[str, bool]:
        if explicit is not None:
            attention = explicit[i]
        else:  # Qwen2MoeConfig's rule; Qwen3MoeConfig has no per-layer window
            attention = ("sliding_attention" if window and not qwen3 and (i + 1) % 2 and i < last_window
                         else "full_attention")
        return attention, i not in dense_only and experts > 0 and (i + 1) % step == 0

    prefix = d.layers if explicit is not None else max([last_window] + [i + 1 for i in dense_only])
    counts = count_layers(d.layers, kind_of, prefix=prefix, period=2 * step // gcd(2, step))
    bias = not qwen3 or bool(f.get("attention_bias", default=False))
    attention = qkvo(d.hidden, d.heads, d.kv_heads, d.head_dim, bias, out_bias=bias if qwen3 else False)
    norms = 2 * d.hidden + (2 * d.head_dim if qwen3 else 0)
    shared = ()
    if not qwen3:
        shared_inter = f.int_or("shared_expert_intermediate_size", default=5632)
        shared = gated_mlp(d.hidden, shared_inter, prefix="mlp.shared_expert") + (
            Linear("mlp.shared_expert_gate", d.hidden, 1),)
    parts = {}
    for kind in counts:
        attention_kind, sparse = kind
        cache = (attention_cache(attention_kind, d.kv_heads, d.head_dim, window),)
        if sparse:
            experts_block = routed(f, d.hidden, moe_inter, experts, 8 if qwen3 else 4)
            parts[kind] = (attention + shared, norms + experts * d.hidden, cache, (experts_block,))
        else:
            parts[kind] = (attention + gated_mlp(d.hidden, d.inter), norms, cache, ())
    return assemble(f, name, model_type, d, dict(counts), parts, bool(f.get("tie_word_embeddings", default=False)))


def deepseek(f: Fields, name: str, model_type: str) -> ArchSpec:
    """DeepSeek-V2/V3: multi-head latent attention, `first_k_dense_replace` dense layers, shared experts."""
    d = read_dims(f)
    experts = f.need("n_routed_experts")
    kv_rank = f.need("kv_lora_rank")
    f.check()
    q_rank = f.int_or("q_lora_rank", default=None)
    nope, rope = f.int_or("qk_nope_head_dim", default=128), f.int_or("qk_rope_head_dim", default=64)
    v_dim = f.int_or("v_head_dim", default=128)
    moe_inter = f.need("moe_intermediate_size")
    shared = f.count_or_zero("n_shared_experts")
    dense = min(f.count_or_zero("first_k_dense_replace"), d.layers)
    bias = bool(f.get("attention_bias", default=False))
    q_width = d.heads * (nope + rope)
    if q_rank:
        query = (Linear("self_attn.q_a_proj", d.hidden, q_rank, bias), Linear("self_attn.q_b_proj", q_rank, q_width))
    else:
        query = (Linear("self_attn.q_proj", d.hidden, q_width),)
    attention = query + (
        Linear("self_attn.kv_a_proj_with_mqa", d.hidden, kv_rank + rope, bias),
        Linear("self_attn.kv_b_proj", kv_rank, d.heads * (nope + v_dim)),
        Linear("self_attn.o_proj", d.heads * v_dim, d.hidden, bias),
    )
    norms = 2 * d.hidden + kv_rank + (q_rank or 0)
    # NOTE: transformers caches MLA's compressed latent: one "head", keys of kv_lora_rank, values of the rope part.
    cache = (CacheLayout("mla", kv_rank, rope),)
    shared_mlp = gated_mlp(d.hidden, moe_inter * shared, prefix="mlp.shared_experts") if shared else ()
    # The router (experts × hidden) stays float32: `_keep_in_fp32_modules_strict = ["gate.weight"]`.
    parts = {
        "dense": (attention + gated_mlp(d.hidden, d.inter), norms, cache, (), 0),
        "moe": (attention + shared_mlp, norms, cache, (routed(f, d.hidden, moe_inter, experts, 8),),
                experts * d.hidden),
    }
    counts = {"dense": dense, "moe": d.layers - dense}
    return assemble(f, name, model_type, d, counts, parts, bool(f.get("tie_word_embeddings", default=False)))


def gpt_oss(f: Fields, name: str, model_type: str) -> ArchSpec:
    """gpt-oss: biased projections, attention sinks, a biased router and biased fused experts, 1:1 windows."""
    d = read_dims(f, head_dim_default=64)
    experts = f.need("num_local_experts")
    f.check()
    window = sliding_window_or_none(f, default=128)
    explicit = explicit_layer_types(f, d.layers)
    counts = count_layers(d.layers, explicit.__getitem__ if explicit else alternating(2),
                          prefix=d.layers if explicit else 0, period=2)
    attention = qkvo(d.hidden, d.heads, d.kv_heads, d.head_dim, bool(f.get("attention_bias", default=True)))
    layer_float = 2 * d.hidden + d.heads + experts * (d.hidden + 1)  # norms, sinks, router weight and bias
    parts = {kind: (attention, layer_float, (attention_cache(kind, d.kv_heads, d.head_dim, window),),
                    (routed(f, d.hidden, d.inter, experts, 4, bias=True, fused_since_v4=True),)) for kind in counts}
    return assemble(f, name, model_type, d, dict(counts), parts, bool(f.get("tie_word_embeddings", default=False)))


READERS = {
    "mixtral": mixtral, "qwen2_moe": qwen_moe, "qwen3_moe": qwen_moe,
    "deepseek_v2": deepseek, "deepseek_v3": deepseek, "gpt_oss": gpt_oss,
}
