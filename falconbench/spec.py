"""Architecture specs read from a Hugging Face config.json, with each family's rules for its fields.

The spec lists the linear layers of one decoder layer (what bitsandbytes quantizes) and the parameters that stay
floating point, so the planner can count bytes exactly. Layouts follow transformers' modeling code
(`modeling_falcon.py`, `modeling_llama.py`, `modeling_mistral.py`, `modeling_mpt.py`, `modeling_gpt_neox.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Linear:
    """One nn.Linear: `in_features` → `out_features`, with or without bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    def __post_init__(self):
        for value in (self.in_features, self.out_features):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"layer {self.name}: features must be positive integers, got {value!r}")

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ArchSpec:
    """What the planner needs to know about a decoder-only transformer."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_linears: tuple[Linear, ...]  # the quantizable linear layers of ONE decoder layer
    layer_norm_params: int  # floating-point parameters of one decoder layer outside its linears (norms)
    embedding_params: int  # input token (and position) embeddings
    final_norm_params: int
    lm_head: Linear | None  # None when the output head is tied to the input embeddings
    intermediate_size: int
    max_positions: int | None = None
    sliding_window: int | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{self.name}: {name} must be a positive integer, got {value!r}. "
                                  "Check the model's config.json")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self.name}: {self.num_heads} attention heads cannot be split into "
                              f"{self.num_kv_heads} KV groups. Check the KV-head field of config.json")

    @property
    def attention(self) -> str:
        """Multi-query, grouped-query or multi-head attention."""
        if self.num_kv_heads == 1:
            return "MQA"
        return "MHA" if self.num_kv_heads == self.num_heads else "GQA"

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is None

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(lin.params for lin in self.layer_linears)

    @property
    def param_count(self) -> int:
        """Parameters, tied weights counted once."""
        head = self.lm_head.params if self.lm_head else 0
        return (self.embedding_params + self.final_norm_params + head
                + self.num_layers * self.layer_norm_params + self.linear_params)


class _Fields:
    """Reads config.json fields, remembering which required ones are missing."""

    def __init__(self, config: dict[str, Any], source: str):
        self.config, self.source, self.missing = config, source, []

    def get(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if self.config.get(name) is not None:
                return self.config[name]
        return default

    def need(self, *names: str) -> int:
        """A required positive integer; a missing one is remembered and reported together by check()."""
        value = self.get(*names)
        if value is None:
            self.missing.append(" or ".join(names))
            return 0
        return self._positive(names[0], value)

    def int_or(self, *names: str, default: int | None) -> int | None:
        """An optional positive integer."""
        value = self.get(*names)
        return default if value is None else self._positive(names[0], value)

    def number_or(self, name: str, default: float) -> float:
        value = self.get(name, default=default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
            raise ConfigError(f"{self.source}: {name} must be a positive number, got {value!r}")
        return value

    def _positive(self, name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{self.source}: {name} must be a positive integer, got {value!r}")
        return value

    def check(self):
        if self.missing:
            raise ConfigError(f"{self.source}: config.json lacks required field(s): {', '.join(self.missing)}. "
                              "Add them, or pass a complete Hugging Face config.json")


def _layernorm(hidden: int, bias: bool = True) -> int:
    return hidden * (2 if bias else 1)


def _falcon(f: _Fields, name: str, model_type: str) -> ArchSpec:
    hidden = f.need("hidden_size", "d_model")
    heads = f.need("num_attention_heads", "n_head")
    layers = f.need("num_hidden_layers", "n_layer")
    vocab = f.need("vocab_size")
    f.check()
    # Legacy "RefinedWeb" (Falcon-40B before transformers adopted it) is the new decoder architecture.
    new_arch = bool(f.get("new_decoder_architecture", default=model_type == "refinedweb"))
    multi_query = bool(f.get("multi_query", default=model_type == "refinedwebmodel"))
    head_dim = hidden // heads
    # NOTE: FalconAttention uses num_kv_heads only with the new decoder architecture, or without multi-query;
    # a multi-query model has ONE K,V head whatever `num_kv_heads` says (fine-tunes often write 71 there).
    if new_arch:
        kv_heads = f.int_or("num_kv_heads", "n_head_kv", default=heads)
    elif multi_query:
        kv_heads = 1
    else:
        kv_heads = heads
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
    # `num_ln_in_parallel_attn` of 2 (its default there); one otherwise.
    if not f.get("parallel_attn", default=True):
        norms = 2
    else:
        norms = 2 if f.get("num_ln_in_parallel_attn", default=2 if new_arch else 1) == 2 else 1
    tied = f.get("tie_word_embeddings", default=True)
    return ArchSpec(
        name=name, model_type="falcon", hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, layer_linears=linears,
        layer_norm_params=norms * _layernorm(hidden), embedding_params=vocab * hidden,
        final_norm_params=_layernorm(hidden), lm_head=None if tied else Linear("lm_head", hidden, vocab),
        intermediate_size=ffn, max_positions=f.int_or("max_position_embeddings", default=2048),
    )


def _llama(f: _Fields, name: str, model_type: str) -> ArchSpec:
    hidden = f.need("hidden_size")
    heads = f.need("num_attention_heads")
    layers = f.need("num_hidden_layers")
    vocab = f.need("vocab_size")
    inter = f.need("intermediate_size")
    f.check()
    # No num_key_value_heads means multi-head attention (LLaMA-1 configs predate the field).
    kv_heads = f.int_or("num_key_value_heads", default=heads)
    head_dim = f.int_or("head_dim", default=hidden // heads)
    attn_bias = bool(f.get("attention_bias", default=False))
    mlp_bias = bool(f.get("mlp_bias", default=False))
    linears = (
        Linear("self_attn.q_proj", hidden, heads * head_dim, attn_bias),
        Linear("self_attn.k_proj", hidden, kv_heads * head_dim, attn_bias),
        Linear("self_attn.v_proj", hidden, kv_heads * head_dim, attn_bias),
        Linear("self_attn.o_proj", heads * head_dim, hidden, attn_bias),
        Linear("mlp.gate_proj", hidden, inter, mlp_bias),
        Linear("mlp.up_proj", hidden, inter, mlp_bias),
        Linear("mlp.down_proj", inter, hidden, mlp_bias),
    )
    tied = bool(f.get("tie_word_embeddings", default=False))
    window = f.int_or("sliding_window", default=None) if model_type == "mistral" else None
    return ArchSpec(
        name=name, model_type=model_type, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, layer_linears=linears,
        layer_norm_params=2 * hidden, embedding_params=vocab * hidden, final_norm_params=hidden,
        lm_head=None if tied else Linear("lm_head", hidden, vocab), intermediate_size=inter,
        max_positions=f.int_or("max_sequence_length", "max_position_embeddings", default=2048), sliding_window=window,
    )


def _mpt(f: _Fields, name: str, model_type: str) -> ArchSpec:
    hidden = f.need("d_model", "hidden_size")
    heads = f.need("n_heads", "num_attention_heads")
    layers = f.need("n_layers", "num_hidden_layers")
    vocab = f.need("vocab_size")
    f.check()
    attn = f.get("attn_config", default={})
    if not isinstance(attn, dict):
        raise ConfigError(f"{f.source}: attn_config must be a JSON object, got {attn!r}")
    head_dim = hidden // heads
    grouped = attn.get("attn_type") in ("grouped_query_attention", "multiquery_attention")
    kv_heads = heads
    if grouped:
        kv_heads = 1 if attn.get("attn_type") == "multiquery_attention" else \
            _Fields(attn, f.source + " attn_config").int_or("kv_n_heads", default=heads)
    ffn = int(f.number_or("expansion_ratio", 4) * hidden)
    linears = (
        Linear("attn.Wqkv", hidden, hidden + 2 * kv_heads * head_dim),
        Linear("attn.out_proj", hidden, hidden),
        Linear("ffn.up_proj", hidden, ffn),
        Linear("ffn.down_proj", ffn, hidden),
    )
    # MPT has no lm_head: logits come from the input embedding (tied), and its LayerNorms have no bias.
    return ArchSpec(
        name=name, model_type="mpt", hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, layer_linears=linears,
        layer_norm_params=2 * hidden, embedding_params=vocab * hidden, final_norm_params=hidden,
        lm_head=None, intermediate_size=ffn, max_positions=f.int_or("max_seq_len", default=None),
    )


def _gpt_neox(f: _Fields, name: str, model_type: str) -> ArchSpec:
    hidden = f.need("hidden_size")
    heads = f.need("num_attention_heads")
    layers = f.need("num_hidden_layers")
    vocab = f.need("vocab_size")
    inter = f.need("intermediate_size")
    f.check()
    bias = bool(f.get("attention_bias", default=True))
    linears = (
        Linear("attention.query_key_value", hidden, 3 * hidden, bias),
        Linear("attention.dense", hidden, hidden, bias),
        Linear("mlp.dense_h_to_4h", hidden, inter, True),
        Linear("mlp.dense_4h_to_h", inter, hidden, True),
    )
    tied = bool(f.get("tie_word_embeddings", default=False))  # StableLM-Alpha's embed_out is its own matrix
    return ArchSpec(
        name=name, model_type="gpt_neox", hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, vocab_size=vocab, layer_linears=linears,
        layer_norm_params=2 * _layernorm(hidden), embedding_params=vocab * hidden,
        final_norm_params=_layernorm(hidden), lm_head=None if tied else Linear("embed_out", hidden, vocab),
        intermediate_size=inter, max_positions=f.int_or("max_position_embeddings", default=None),
    )


_READERS: dict[str, Callable[[_Fields, str, str], ArchSpec]] = {
    "falcon": _falcon, "refinedweb": _falcon, "refinedwebmodel": _falcon,
    "llama": _llama, "mistral": _llama,
    "mpt": _mpt,
    "gpt_neox": _gpt_neox,
}
SUPPORTED_MODEL_TYPES = tuple(_READERS)


def spec_from_config(config: dict[str, Any], name: str = "model", source: str | None = None) -> ArchSpec:
    """The architecture of a model from its config.json contents (a dict)."""
    source = source or name
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: config.json must hold a JSON object, not {type(config).__name__}")
    model_type = str(config.get("model_type", "")).lower()
    reader = _READERS.get(model_type)
    fields = _Fields(config, source)
    if reader is not None:
        return reader(fields, name, model_type)
    # Unknown families: a Llama-shaped decoder is the common case (Qwen, Yi, InternLM...). Plan it, and say so.
    standard = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    if all(isinstance(config.get(k), int) for k in standard):
        spec = _llama(fields, name, model_type or "unknown")
        warning = (f"model_type {model_type or '(none)'!r} is not one falconbench knows; planned as a "
                   "Llama-style decoder from its standard fields")
        return _replace_warnings(spec, (warning,))
    missing = [k for k in standard if not isinstance(config.get(k), int)]
    raise ConfigError(
        f"{source}: unsupported model_type {model_type or '(none)'!r} and config.json lacks the standard "
        f"field(s) {', '.join(missing)}. Supported types: {', '.join(SUPPORTED_MODEL_TYPES)}")


def _replace_warnings(spec: ArchSpec, warnings: tuple[str, ...]) -> ArchSpec:
    from dataclasses import replace

    return replace(spec, warnings=spec.warnings + warnings)
