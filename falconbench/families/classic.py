"""The older decoders: Falcon (7B, 40B, 180B, Falcon 2), MPT, GPT-NeoX/StableLM-Alpha, GPT-2, GPT-J, OPT, BLOOM.

Layouts follow transformers' `modeling_falcon.py`, `modeling_mpt.py`, `modeling_gpt_neox.py`, `modeling_gpt2.py`,
`modeling_gptj.py`, `modeling_opt.py` and `modeling_bloom.py`. All use full attention.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..spec import ArchSpec, Fields, LayerGroup, Linear
from .common import attention_cache, layernorm, read_core

# GPT-2 and GPT-J spell the widths their own way (transformers maps them to the standard names too).
GPT_SPELLING = {"hidden": ("n_embd", "hidden_size"), "heads": ("n_head", "num_attention_heads"),
                "layers": ("n_layer", "num_hidden_layers")}


def uniform(name: str, model_type: str, *, hidden: int, heads: int, kv_heads: int, layers: int, vocab: int,
            linears: tuple[Linear, ...], layer_float: int, embedding: int | tuple[int, ...], final_norm: int,
            head: Linear | None, inter: int, max_positions: int | None, extra: tuple[Linear, ...] = ()) -> ArchSpec:
    """A decoder of identical full-attention layers; `embedding` is the embeddings' parameters, or each embedding
    module's in module order when there are several."""
    parts = embedding if isinstance(embedding, tuple) else (embedding,)
    head_dim = hidden // heads  # checked by f.head_dim above
    group = LayerGroup(layers, linears, layer_float, (attention_cache("full_attention", kv_heads, head_dim, None),))
    return ArchSpec(name=name, model_type=model_type, hidden_size=hidden, num_heads=heads, vocab_size=vocab,
                    groups=(group,), embedding_params=sum(parts), final_norm_params=final_norm, lm_head=head,
                    intermediate_size=inter, extra_linears=extra, num_kv_heads=kv_heads, head_dim=head_dim,
                    max_positions=max_positions, embedding_parts=parts if len(parts) > 1 else ())


def falcon(f: Fields, name: str, model_type: str) -> ArchSpec:
    hidden, heads, layers, vocab = read_core(
        f, hidden=("hidden_size", "d_model"), heads=("num_attention_heads", "n_head"),
        layers=("num_hidden_layers", "n_layer"))
    # Legacy "RefinedWeb" (Falcon-40B before transformers adopted it) is the new decoder architecture.
    new_arch = bool(f.get("new_decoder_architecture", default=model_type == "refinedweb"))
    multi_query = bool(f.get("multi_query", default=model_type == "refinedwebmodel"))
    head_dim = hidden // heads  # checked by f.head_dim above
    # NOTE: FalconAttention uses num_kv_heads only with the new decoder architecture, or without multi-query;
    # a multi-query model has ONE K,V head whatever `num_kv_heads` says (fine-tunes often write 71 there).
    if new_arch:
        kv_heads = f.int_or("num_kv_heads", "n_head_kv", default=heads)
    else:
        kv_heads = 1 if multi_query else heads
    bias = bool(f.get("bias", default=False))
    if new_arch:
        qkv_out = (heads + 2 * kv_heads) * head_dim
    elif multi_query:
        qkv_out = hidden + 2 * head_dim
    else:
        qkv_out = 3 * hidden
    ffn = f.int_or("ffn_hidden_size", default=4 * hidden)
    linears = (
        Linear("self_attention.query_key_value", hidden, qkv_out, bias),
        Linear("self_attention.dense", hidden, hidden, bias),
        Linear("mlp.dense_h_to_4h", hidden, ffn, bias),
        Linear("mlp.dense_4h_to_h", ffn, hidden, bias),
    )
    # FalconDecoderLayer: two LayerNorms without parallel attention, or with the new architecture's
    # `num_ln_in_parallel_attn` of 2 (its default there); one otherwise (Falcon-7B, Falcon 2 11B).
    if not f.get("parallel_attn", default=True):
        norms = 2
    else:
        norms = 2 if f.get("num_ln_in_parallel_attn", default=2 if new_arch else 1) == 2 else 1
    tied = f.get("tie_word_embeddings", default=True)
    return uniform(name, "falcon", hidden=hidden, heads=heads, kv_heads=kv_heads, layers=layers, vocab=vocab,
                   linears=linears, layer_float=norms * layernorm(hidden), embedding=vocab * hidden,
                   final_norm=layernorm(hidden), head=None if tied else Linear("lm_head", hidden, vocab), inter=ffn,
                   max_positions=f.int_or("max_position_embeddings", default=2048))


def mpt(f: Fields, name: str, model_type: str) -> ArchSpec:
    hidden, heads, layers, vocab = read_core(
        f, hidden=("d_model", "hidden_size"), heads=("n_heads", "num_attention_heads"),
        layers=("n_layers", "num_hidden_layers"))
    attn = f.get("attn_config", default={})
    if not isinstance(attn, dict):
        raise ConfigError(f"{f.source}: attn_config must be a JSON object, got {str(attn)[:40]!r}")
    head_dim = hidden // heads  # checked by f.head_dim above
    kv_heads = heads
    if attn.get("attn_type") == "multiquery_attention":
        kv_heads = 1
    elif attn.get("attn_type") == "grouped_query_attention":
        kv_heads = Fields(attn, f.source + " attn_config").int_or("kv_n_heads", default=heads)
    ffn = int(f.number_or("expansion_ratio", 4) * hidden)
    linears = (
        Linear("attn.Wqkv", hidden, hidden + 2 * kv_heads * head_dim),
        Linear("attn.out_proj", hidden, hidden),
        Linear("ffn.up_proj", hidden, ffn),
        Linear("ffn.down_proj", ffn, hidden),
    )
    # MPT has no lm_head: logits come from the input embedding (tied), and its LayerNorms have no bias.
    return uniform(name, "mpt", hidden=hidden, heads=heads, kv_heads=kv_heads, layers=layers, vocab=vocab,
                   linears=linears, layer_float=2 * hidden, embedding=vocab * hidden, final_norm=hidden, head=None,
                   inter=ffn, max_positions=f.int_or("max_seq_len", default=None))


def gpt_neox(f: Fields, name: str, model_type: str) -> ArchSpec:
    hidden, heads, layers, vocab, inter = read_core(f, extra=("intermediate_size",))
    bias = bool(f.get("attention_bias", default=True))
    linears = (
        Linear("attention.query_key_value", hidden, 3 * hidden, bias),
        Linear("attention.dense", hidden, hidden, bias),
        Linear("mlp.dense_h_to_4h", hidden, inter, True),
        Linear("mlp.dense_4h_to_h", inter, hidden, True),
    )
    tied = bool(f.get("tie_word_embeddings", default=False))  # StableLM-Alpha's embed_out is its own matrix
    return uniform(name, "gpt_neox", hidden=hidden, heads=heads, kv_heads=heads, layers=layers, vocab=vocab,
                   linears=linears, layer_float=2 * layernorm(hidden), embedding=vocab * hidden,
                   final_norm=layernorm(hidden), head=None if tied else Linear("embed_out", hidden, vocab),
                   inter=inter, max_positions=f.int_or("max_position_embeddings", default=None))


def gpt2(f: Fields, name: str, model_type: str) -> ArchSpec:
    """GPT-2: Conv1D projections (which transformers' bitsandbytes integration quantizes too), learned positions."""
    hidden, heads, layers, vocab = read_core(f, **GPT_SPELLING)
    positions = f.int_or("n_positions", "max_position_embeddings", default=1024)
    inner = f.int_or("n_inner", default=4 * hidden)
    linears = (
        Linear("attn.c_attn", hidden, 3 * hidden, True),
        Linear("attn.c_proj", hidden, hidden, True),
        Linear("mlp.c_fc", hidden, inner, True),
        Linear("mlp.c_proj", inner, hidden, True),
    )
    tied = bool(f.get("tie_word_embeddings", default=True))
    return uniform(name, "gpt2", hidden=hidden, heads=heads, kv_heads=heads, layers=layers, vocab=vocab,
                   linears=linears, layer_float=2 * layernorm(hidden), embedding=(vocab * hidden, positions * hidden),
                   final_norm=layernorm(hidden), head=None if tied else Linear("lm_head", hidden, vocab),
                   inter=inner, max_positions=positions)


def gptj(f: Fields, name: str, model_type: str) -> ArchSpec:
    """GPT-J: parallel attention and MLP under one LayerNorm, unbiased q/k/v/out, a biased head."""
    hidden, heads, layers, vocab = read_core(f, **GPT_SPELLING)
    inner = f.int_or("n_inner", default=4 * hidden)
    linears = (
        Linear("attn.k_proj", hidden, hidden), Linear("attn.v_proj", hidden, hidden),
        Linear("attn.q_proj", hidden, hidden), Linear("attn.out_proj", hidden, hidden),
        Linear("mlp.fc_in", hidden, inner, True), Linear("mlp.fc_out", inner, hidden, True),
    )
    tied = bool(f.get("tie_word_embeddings", default=False))
    return uniform(name, "gptj", hidden=hidden, heads=heads, kv_heads=heads, layers=layers, vocab=vocab,
                   linears=linears, layer_float=layernorm(hidden), embedding=vocab * hidden,
                   final_norm=layernorm(hidden), head=None if tied else Linear("lm_head", hidden, vocab, True),
                   inter=inner, max_positions=f.int_or("n_positions", default=2048))


def opt(f: Fields, name: str, model_type: str) -> ArchSpec:
    """OPT: learned positions with an offset of 2, biased projections, optional in/out projections (350M)."""
    hidden, heads, layers, vocab, ffn = read_core(f, extra=("ffn_dim",))
    positions = f.int_or("max_position_embeddings", default=2048)
    proj = f.int_or("word_embed_proj_dim", default=hidden)
    bias = bool(f.get("enable_bias", default=True))
    affine = bool(f.get("layer_norm_elementwise_affine", default=True))
    norm = layernorm(hidden, bias) if affine else 0
    linears = (
        Linear("self_attn.k_proj", hidden, hidden, bias), Linear("self_attn.v_proj", hidden, hidden, bias),
        Linear("self_attn.q_proj", hidden, hidden, bias), Linear("self_attn.out_proj", hidden, hidden, bias),
        Linear("fc1", hidden, ffn, bias), Linear("fc2", ffn, hidden, bias),
    )
    extra = (Linear("project_out", hidden, proj), Linear("project_in", proj, hidden)) if proj != hidden else ()
    # OPTDecoder keeps a final LayerNorm only for pre-norm models that have not removed it (350M has none).
    final = norm if f.get("do_layer_norm_before", default=True) and not f.get("_remove_final_layer_norm",
                                                                              default=False) else 0
    tied = bool(f.get("tie_word_embeddings", default=True))
    return uniform(name, "opt", hidden=hidden, heads=heads, kv_heads=heads, layers=layers, vocab=vocab,
                   linears=linears, layer_float=2 * norm, embedding=(vocab * proj, (positions + 2) * hidden),
                   final_norm=final, head=None if tied else Linear("lm_head", proj, vocab), inter=ffn,
                   max_positions=positions, extra=extra)


def bloom(f: Fields, name: str, model_type: str) -> ArchSpec:
    """BLOOM: ALiBi (no position embeddings), a LayerNorm after the embeddings, biased fused qkv."""
    hidden, heads, layers, vocab = read_core(
        f, hidden=("hidden_size", "n_embed"), heads=("n_head", "num_attention_heads"),
        layers=("n_layer", "num_hidden_layers"))
    linears = (
        Linear("self_attention.query_key_value", hidden, 3 * hidden, True),
        Linear("self_attention.dense", hidden, hidden, True),
        Linear("mlp.dense_h_to_4h", hidden, 4 * hidden, True),
        Linear("mlp.dense_4h_to_h", 4 * hidden, hidden, True),
    )
    tied = bool(f.get("tie_word_embeddings", default=True))
    return uniform(name, "bloom", hidden=hidden, heads=heads, kv_heads=heads, layers=layers, vocab=vocab,
                   linears=linears, layer_float=2 * layernorm(hidden),
                   embedding=(vocab * hidden, layernorm(hidden)), final_norm=layernorm(hidden),
                   head=None if tied else Linear("lm_head", hidden, vocab), inter=4 * hidden,
                   max_positions=f.int_or("seq_length", default=None))


READERS = {
    "falcon": falcon, "refinedweb": falcon, "refinedwebmodel": falcon,
    "mpt": mpt, "gpt_neox": gpt_neox, "gpt2": gpt2, "gptj": gptj, "opt": opt, "bloom": bloom,
}
