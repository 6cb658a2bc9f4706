"""State-space models: Mamba and Falcon-Mamba (recurrent state only), Falcon-H1 (attention and Mamba-2 in every layer).

Layouts follow transformers' `modeling_mamba.py`, `modeling_falcon_mamba.py` and `modeling_falcon_h1.py`. Their
cache does not grow with the context: per sequence, a convolution state (channels × kernel, in the model's dtype)
and an SSM state (float32).
"""

from __future__ import annotations

from math import ceil

from ..spec import ArchSpec, CacheLayout, Fields, LayerGroup, Linear
from .common import attention_cache, gated_mlp, qkvo, read_core


def mamba(f: Fields, name: str, model_type: str) -> ArchSpec:
    hidden = f.need("hidden_size", "d_model")
    layers = f.need("num_hidden_layers", "n_layer")
    vocab = f.need("vocab_size")
    f.check()
    state = f.int_or("state_size", "d_state", default=16)
    kernel = f.int_or("conv_kernel", "d_conv", default=4)
    # NOTE: MambaConfig derives the width from `expand` and ignores any intermediate_size in config.json.
    inter = int(f.number_or("expand", 2) * hidden)
    rank = f.get("time_step_rank", default="auto")
    rank = ceil(hidden / 16) if rank == "auto" else f.positive("time_step_rank", rank)
    bias, conv_bias = bool(f.get("use_bias", default=False)), bool(f.get("use_conv_bias", default=True))
    linears = (
        Linear("mixer.in_proj", hidden, 2 * inter, bias),
        Linear("mixer.x_proj", inter, rank + 2 * state),
        Linear("mixer.dt_proj", rank, inter, True),
        Linear("mixer.out_proj", inter, hidden, bias),
    )
    # norm, depthwise conv1d (channels × kernel, + bias), A_log (channels × state), D (channels)
    layer_float = hidden + inter * kernel + (inter if conv_bias else 0) + inter * state + inter
    cache = CacheLayout("recurrent", conv_elements=inter * kernel, state_elements=inter * state)
    tied = bool(f.get("tie_word_embeddings", default=True))
    return ArchSpec(
        name=name, model_type=model_type, hidden_size=hidden, num_heads=1, vocab_size=vocab,
        groups=(LayerGroup(layers, linears, layer_float, (cache,)),), embedding_params=vocab * hidden,
        final_norm_params=hidden, lm_head=None if tied else Linear("lm_head", hidden, vocab),
        intermediate_size=inter, max_positions=None,
    )


def falcon_h1(f: Fields, name: str, model_type: str) -> ArchSpec:
    """Falcon-H1: each layer runs attention and a Mamba-2 mixer side by side, then a SwiGLU MLP."""
    hidden, heads, layers, vocab, inter = read_core(f, extra=("intermediate_size",))
    kv_heads = f.int_or("num_key_value_heads", default=heads)
    head_dim = f.head_dim(hidden, heads)
    d_ssm = f.int_or("mamba_d_ssm", default=f.int_or("mamba_expand", default=2) * hidden)
    ssm_heads = f.int_or("mamba_n_heads", default=128)
    d_head = f.get("mamba_d_head", default="auto")
    d_head = d_ssm // ssm_heads if d_head == "auto" else f.positive("mamba_d_head", d_head)
    groups, state = f.int_or("mamba_n_groups", default=1), f.int_or("mamba_d_state", default=256)
    kernel = f.int_or("mamba_d_conv", default=4)
    conv_dim = d_ssm + 2 * groups * state
    linears = qkvo(hidden, heads, kv_heads, head_dim, bool(f.get("attention_bias", default=False))) + (
        Linear("mamba.in_proj", hidden, d_ssm + conv_dim + ssm_heads, bool(f.get("mamba_proj_bias", default=False))),
        Linear("mamba.out_proj", d_ssm, hidden, bool(f.get("projectors_bias", default=False))),
    ) + gated_mlp(hidden, inter, bool(f.get("mlp_bias", default=False)), prefix="feed_forward")
    conv = conv_dim * kernel + (conv_dim if f.get("mamba_conv_bias", default=True) else 0)
    norms = 2 * hidden + (d_ssm if f.get("mamba_rms_norm", default=False) else 0)
    layer_float = norms + conv + 3 * ssm_heads  # + dt_bias, A_log, D per SSM head
    caches = (attention_cache("full_attention", kv_heads, head_dim, None),
              CacheLayout("recurrent", conv_elements=conv_dim * kernel, state_elements=ssm_heads * d_head * state))
    tied = bool(f.get("tie_word_embeddings", default=False))
    return ArchSpec(
        name=name, model_type=model_type, hidden_size=hidden, num_heads=heads, vocab_size=vocab,
        groups=(LayerGroup(layers, linears, layer_float, caches),), embedding_params=vocab * hidden,
        final_norm_params=hidden, lm_head=None if tied else Linear("lm_head", hidden, vocab),
        intermediate_size=inter, num_kv_heads=kv_heads, head_dim=head_dim,
        max_positions=f.int_or("max_position_embeddings", default=None),
    )


READERS = {"mamba": mamba, "falcon_mamba": mamba, "falcon_h1": falcon_h1}
