"""Architecture specs: what the planner needs to know about a causal LM, read from its config.json.

A spec lists, per group of identical decoder layers, the linear layers bitsandbytes quantizes, the fused expert
parameters it does not, the parameters that stay floating point, and what each layer caches (full attention, a
sliding window, an MLA latent, or a recurrent state). Groups carry a count, so a spec's size does not grow with
the layer count. The readers of each family live in `falconbench/families/`; a model type no reader knows is
either laid out from the installed transformers on the meta device (`layout.py`) or planned as a Llama-shaped
estimate, labelled so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import ConfigError

CacheKind = Literal["full_attention", "sliding_attention", "mla", "recurrent"]
CACHE_KINDS: tuple[str, ...] = ("full_attention", "sliding_attention", "mla", "recurrent")
# What a plan's weights and KV cache are: exact (a family reader or the installed transformers' own layout) or an
# estimate (an unknown type read as a Llama-shaped decoder, torch not installed to lay it out).
Exactness = Literal["exact", "estimate"]
# NOTE: transformers' DynamicSlidingWindowLayer keeps one int64 scalar (its cumulative length) beside K and V.
SLIDING_LAYER_EXTRA_BYTES = 8
SSM_STATE_BYTES = 4  # Mamba's recurrent (SSM) state is float32 whatever the model's dtype


def positive_int(value: Any) -> bool:
    """True for a positive int (bool excluded): the one check every count and width goes through."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Linear:
    """One nn.Linear (or GPT-2's Conv1D): `in_features` → `out_features`, with or without bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    def __post_init__(self):
        for value in (self.in_features, self.out_features):
            if not positive_int(value):
                raise ConfigError(f"layer {self.name}: features must be positive integers, got {value!r}. "
                                  "Check the widths in config.json (heads, hidden and intermediate sizes)")

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts block: `num_experts` copies of `linears`.

    transformers 5 stores them fused, as 3-D parameters (`mlp.experts.gate_up_proj`, `down_proj`), which
    bitsandbytes ≤ 0.50 does not quantize (bitsandbytes issue #1849); transformers 4 built one nn.Linear each.
    """

    name: str
    num_experts: int
    linears: tuple[Linear, ...]  # ONE expert's projections
    fused_since_v4: bool = False  # gpt-oss was fused from its first release; Mixtral, Qwen-MoE, DeepSeek in v5
    active: int = 0  # experts each token is routed to (`num_experts_per_tok`); 0 when unknown: all of them

    @property
    def params(self) -> int:
        return self.num_experts * sum(lin.params for lin in self.linears)


@dataclass(frozen=True)
class CacheLayout:
    """What one decoder layer caches, per sequence: K/V widths per token, a window, or a recurrent state."""

    kind: CacheKind
    key_width: int = 0  # elements per token: kv_heads × head_dim (MLA: the latent kv_lora_rank)
    value_width: int = 0  # elements per token (MLA: the rotary part, qk_rope_head_dim)
    window: int | None = None  # sliding_attention: tokens kept
    conv_elements: int = 0  # recurrent: convolution state per sequence, in the model's dtype
    state_elements: int = 0  # recurrent: SSM state per sequence, float32

    def __post_init__(self):
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"cache kind must be one of {', '.join(CACHE_KINDS)}, not {self.kind!r}")
        if self.kind == "sliding_attention" and not positive_int(self.window):
            raise ConfigError(f"a sliding-window layer needs a positive window, got {self.window!r}. "
                              "Set sliding_window in config.json")

    @property
    def grows(self) -> bool:
        """Whether the cache grows with every token (full attention and MLA) or stops (window, recurrent)."""
        return self.kind in ("full_attention", "mla")

    def tokens(self, context: int) -> int:
        if self.kind == "recurrent":
            return 0
        return min(context, self.window) if self.kind == "sliding_attention" else context

    def bytes(self, context: int, batch: int, kv_bytes: int, model_dtype_bytes: int) -> int:
        """Bytes this layer's cache holds at `context` tokens for `batch` sequences."""
        if self.kind == "recurrent":
            return batch * (self.conv_elements * model_dtype_bytes + self.state_elements * SSM_STATE_BYTES)
        kv = batch * self.tokens(context) * (self.key_width + self.value_width) * kv_bytes
        return kv + (SLIDING_LAYER_EXTRA_BYTES if self.kind == "sliding_attention" else 0)


@dataclass(frozen=True)
class LayerGroup:
    """`count` identical decoder layers."""

    count: int
    linears: tuple[Linear, ...]  # quantizable: nn.Linear and Conv1D modules of one layer
    float_params: int  # parameters outside those linears and the experts: norms, routers, convolutions, ...
    caches: tuple[CacheLayout, ...] = ()  # usually one; a hybrid layer (Falcon-H1) caches attention and state
    experts: tuple[Experts, ...] = ()
    fp32_params: int = 0  # kept in float32 in every scheme (`_keep_in_fp32_modules_strict`: DeepSeek's router)

    def __post_init__(self):
        if not positive_int(self.count):
            raise ConfigError(f"a layer group needs a positive layer count, got {self.count!r}")

    @property
    def params(self) -> int:
        return (sum(lin.params for lin in self.linears) + self.float_params + self.fp32_params
                + sum(e.params for e in self.experts))

    @property
    def label(self) -> str:
        kinds = "+".join(c.kind for c in self.caches) or "no cache"
        return kinds + (" + experts" if self.experts else "")


@dataclass(frozen=True)
class ArchSpec:
    """What the planner needs to know about a causal LM."""

    name: str
    model_type: str
    hidden_size: int
    num_heads: int
    vocab_size: int
    groups: tuple[LayerGroup, ...]
    embedding_params: int  # input token (and position) embeddings, and their norm
    final_norm_params: int
    lm_head: Linear | None  # None when the output head is tied to the input embeddings
    intermediate_size: int
    extra_linears: tuple[Linear, ...] = ()  # quantizable linears outside the decoder layers (OPT's projections)
    # the parameters of each module the embeddings are made of, in module order, when there are several (GPT-2's
    # token and position embeddings, BLOOM's embeddings and their norm; they sum to embedding_params); () is one
    embedding_parts: tuple[int, ...] = ()
    num_kv_heads: int = 0  # of the attention layers (0: no attention)
    head_dim: int = 0
    max_positions: int | None = None
    exactness: Exactness = "exact"
    origin: str = "falconbench family reader"  # who laid it out
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "vocab_size"):
            value = getattr(self, name)
            if not positive_int(value):
                raise ConfigError(f"{self.name}: {name} must be a positive integer, got {value!r}. "
                                  "Check the model's config.json")
        if not self.groups:
            raise ConfigError(f"{self.name}: no decoder layers. Check num_hidden_layers in config.json")
        if self.embedding_parts and sum(self.embedding_parts) != self.embedding_params:
            raise ConfigError(f"{self.name}: the embedding modules' parameters {self.embedding_parts} do not add up "
                              f"to {self.embedding_params}. Report this with the model's config.json")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self.name}: {self.num_heads} attention heads cannot be split into "
                              f"{self.num_kv_heads} KV groups. Check the KV-head field of config.json")

    @property
    def num_layers(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def layer_linears(self) -> tuple[Linear, ...]:
        """The quantizable linears of the first group's layer (every layer's, for a uniform model)."""
        return self.groups[0].linears

    @property
    def layer_norm_params(self) -> int:
        return self.groups[0].float_params

    @property
    def caches(self) -> tuple[tuple[int, CacheLayout], ...]:
        """(layer count, layout) for every cached part of every group."""
        return tuple((g.count, c) for g in self.groups for c in g.caches)

    @property
    def sliding_window(self) -> int | None:
        windows = [c.window for _, c in self.caches if c.kind == "sliding_attention"]
        return max(windows) if windows else None

    @property
    def cache_grows(self) -> bool:
        """Whether any layer's cache grows with the context (else memory sets no context limit)."""
        return any(c.grows for _, c in self.caches)

    @property
    def attention(self) -> str:
        """Multi-query, grouped-query or multi-head attention; MLA; or none (a pure state-space model)."""
        kinds = {c.kind for _, c in self.caches}
        if kinds == {"recurrent"}:
            return "SSM"
        if "mla" in kinds:
            return "MLA"
        if self.num_kv_heads == 1:
            return "MQA"
        return "MHA" if self.num_kv_heads == self.num_heads else "GQA"

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is None

    @property
    def experts_params(self) -> int:
        return sum(g.count * e.params for g in self.groups for e in g.experts)

    @property
    def linear_params(self) -> int:
        return (sum(g.count * sum(lin.params for lin in g.linears) for g in self.groups)
                + sum(lin.params for lin in self.extra_linears))

    @property
    def param_count(self) -> int:
        """Parameters, tied weights counted once."""
        head = self.lm_head.params if self.lm_head else 0
        return (self.embedding_params + self.final_norm_params + head
                + sum(lin.params for lin in self.extra_linears) + sum(g.count * g.params for g in self.groups))


def with_warnings(spec: ArchSpec, *warnings: str) -> ArchSpec:
    return replace(spec, warnings=spec.warnings + tuple(warnings))


class Fields:
    """Reads config.json fields, remembering which required ones are missing."""

    # Widths and counts past these are no model: refuse them by name rather than overflow later.
    MAX_COUNT = 10**15

    def __init__(self, config: dict[str, Any], source: str, model_type: str = ""):
        self.config, self.source, self.model_type, self.missing = config, source, model_type, []

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
            return 1
        return self.positive(names[0], value)

    def int_or(self, *names: str, default: int | None) -> int | None:
        """An optional positive integer."""
        value = self.get(*names)
        return default if value is None else self.positive(names[0], value)

    def count_or_zero(self, *names: str) -> int:
        """An optional non-negative integer (0 when absent): expert counts, dense-layer counts."""
        value = self.get(*names, default=0)
        return 0 if value == 0 else self.positive(names[0], value)

    def number_or(self, name: str, default: float) -> float:
        value = self.get(name, default=default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
            raise ConfigError(f"{self.source}: {name} must be a positive number, got {value!r}")
        return value

    def int_list(self, name: str) -> list[int]:
        value = self.get(name, default=[])
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{self.source}: {name} must be a list of layer indices, got {value!r}")
        return value

    def positive(self, name: str, value: Any) -> int:
        if not positive_int(value) or value > self.MAX_COUNT:
            raise ConfigError(f"{self.source}: {name} must be a positive integer up to {self.MAX_COUNT:.0e}, "
                              f"got {str(value)[:40]!r}")
        return value

    def head_dim(self, hidden: int, heads: int, field: str | None = "head_dim") -> int:
        """The configured head width (`field`), or hidden ÷ heads; refused by name when the heads do not fit."""
        if field and self.get(field) is not None:
            return self.positive(field, self.get(field))
        if hidden // heads < 1:
            raise ConfigError(f"{self.source}: {heads} attention heads do not fit a hidden size of {hidden} "
                              "(each head would be 0 wide). Check num_attention_heads and hidden_size")
        return hidden // heads

    def check(self):
        if self.missing:
            kind = f"{self.model_type!r} " if self.model_type else ""
            raise ConfigError(f"{self.source}: the {kind}config.json lacks required field(s): "
                              f"{', '.join(self.missing)}. Add them, or pass a complete Hugging Face config.json")


def spec_from_config(config: dict[str, Any], name: str = "model", source: str | None = None) -> ArchSpec:
    """The architecture of a model from its config.json contents (a dict), by its family's reader."""
    from .families import READERS, SUPPORTED_MODEL_TYPES, llama_shaped_estimate

    source = source or name
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: config.json must hold a JSON object, not {type(config).__name__}")
    model_type = str(config.get("model_type", "")).lower()
    reader = READERS.get(model_type)
    fields = Fields(config, source, model_type)
    if reader is not None:
        return reader(fields, name, model_type)
    from .layout import layout_spec

    standard = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    has_standard = all(positive_int(config.get(k)) for k in standard)
    laid_out = layout_spec(config, name, source, estimate_allowed=has_standard)
    if laid_out is not None:
        return laid_out
    if has_standard:
        return llama_shaped_estimate(fields, name, model_type)
    missing = [k for k in standard if not positive_int(config.get(k))]
    raise ConfigError(
        f"{source}: model_type {model_type or '(none)'!r} has no falconbench reader and config.json lacks the "
        f"standard field(s) {', '.join(missing)}. Readers: {', '.join(SUPPORTED_MODEL_TYPES)}; with torch and "
        "transformers installed, any type transformers ships is laid out exactly")
