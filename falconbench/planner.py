"""The planner: exact weights and KV-cache bytes, and documented estimates of the runtime around them.

Everything is integer bytes. Weights and KV cache are exact for the layouts in `spec.py`; the runtime parts
(CUDA context, prefill activations, attention scores, logits) are estimates until `falconbench run` measures
them, and are labelled as such wherever they are shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Literal

from .errors import UsageError
from .gpus import GPU, gpu_profiles, runs_dtype
from .libraries import experts_quantized
from .schemes import FP32, KV_DTYPE_AUTO, Scheme, compute_bytes, get_scheme, kv_dtype_bytes, kv_dtype_for
from .sources import resolve_model
from .spec import ArchSpec, LayerGroup, Linear, positive_int

MIB = 2**20
AttnImpl = Literal["sdpa", "eager"]
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "eager")
DEVICES: tuple[str, ...] = ("cuda", "cpu")

# Estimate: what a CUDA context with torch's kernels and cuBLAS workspace takes before any tensor exists.
# Typical of recent drivers with lazy module loading (CUDA_MODULE_LOADING=LAZY, torch's default); `run`
# measures the real figure as NVML's device-used bytes after CUDA init, minus the baseline.
CUDA_CONTEXT_BYTES = 512 * MIB
# Estimate: the share of a card kept free for the allocator's fragmentation and the display/driver.
SAFETY_MARGIN = 0.05
# During generate, prefill computes logits for the last position only (transformers' `logits_to_keep=1`), in the
# model's compute dtype (transformers 5 no longer upcasts them in the model), and generate copies them to float32
# (`.to(copy=True, dtype=torch.float32)` in generation/utils.py): both are alive at once.
LOGITS_POSITIONS_IN_GENERATE = 1
LOGITS_COPY_BYTES_PER_ELEMENT = 4


@dataclass(frozen=True)
class PlanRow:
    """One plan point: a model in one scheme at one context and batch."""

    model: str
    dtype: str
    context: int
    batch: int
    kv_dtype: str
    attention: str  # MQA / GQA / MHA
    kv_heads: int
    params: int
    weights_bytes: int
    kv_cache_bytes: int
    cuda_context_bytes: int
    activation_bytes: int
    attention_scores_bytes: int
    logits_bytes: int
    attn_impl: str
    device: str
    quantized_params: int = 0  # weights bitsandbytes holds quantized (0 in a float scheme)
    kv_cache_by_layer_type: dict[str, int] = field(default_factory=dict)
    exactness: str = "exact"  # of weights and KV cache: "exact", or "estimate" for an unknown type without torch
    unquantized_params: int = 0  # of a quantized scheme: large blocks left 16-bit by the libraries (fused experts)
    warnings: tuple[str, ...] = field(default=())
    fits_gpus: tuple[str, ...] = field(default=())
    placement: Any = None  # placement.Placement under a device map and its budgets (plan/fit --device-map)

    @property
    def runtime_bytes(self) -> int:
        """The estimated parts: CUDA context and the prefill's transient tensors."""
        return self.cuda_context_bytes + self.activation_bytes + self.attention_scores_bytes + self.logits_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.runtime_bytes

    def as_dict(self) -> dict:
        from dataclasses import asdict

        row = asdict(self)
        row["runtime_bytes"] = self.runtime_bytes
        row["total_bytes"] = self.total_bytes
        row["warnings"] = list(self.warnings)
        row["fits_gpus"] = list(self.fits_gpus)
        row["kv_cache_by_layer_type"] = dict(self.kv_cache_by_layer_type)
        return row

    @property
    def limited_by_libraries(self) -> bool:
        """A quantized row whose libraries leave a large block 16-bit (fused MoE experts)."""
        return self.unquantized_params > 0


def layer_quantized_linears(group: LayerGroup, scheme: Scheme) -> Iterator[tuple[int, Linear]]:
    """(how many, linear) per layer of `group` that bitsandbytes holds quantized in `scheme` (none if float).

    transformers' integration replaces nn.Linear and Conv1D modules, never the output head; falconbench's loader
    also quantizes the nn.Linear subclasses transformers 5 skips (Falcon's FalconLinear). Fused experts follow
    `libraries.experts_quantized`.
    """
    if not scheme.quantized:
        return
    for lin in group.linears:
        yield 1, lin
    for experts in group.experts:
        if experts_quantized(experts.fused_since_v4):
            for lin in experts.linears:
                yield experts.num_experts, lin


def quantized_params(spec: ArchSpec, scheme: Scheme) -> int:
    """Weights (biases excluded) that bitsandbytes stores quantized; 0 for a float scheme."""
    if not scheme.quantized:
        return 0
    outer = sum(lin.in_features * lin.out_features for lin in spec.extra_linears)
    return outer + sum(g.count * n * lin.in_features * lin.out_features
                       for g in spec.groups for n, lin in layer_quantized_linears(g, scheme))


def layer_bytes(group: LayerGroup, scheme: Scheme) -> int:
    """Bytes of ONE layer of `group` in `scheme`: quantized linears in the scheme's storage (biases stay
    floating point), everything else at the float width, `_keep_in_fp32_modules_strict` parameters in float32."""
    quantized = list(layer_quantized_linears(group, scheme))
    stored = sum(n * scheme.linear_weight_bytes(lin.in_features, lin.out_features) for n, lin in quantized)
    floating = group.params - group.fp32_params - sum(n * lin.in_features * lin.out_features for n, lin in quantized)
    return stored + floating * scheme.float_bytes + group.fp32_params * FP32


def linear_bytes(lin: Linear, scheme: Scheme, quantized: bool) -> int:
    """One linear's bytes: its weight in the scheme's storage when bitsandbytes holds it, else at the float width;
    its bias always at the float width."""
    weight = (scheme.linear_weight_bytes(lin.in_features, lin.out_features) if quantized
              else lin.in_features * lin.out_features * scheme.float_bytes)
    return weight + (lin.out_features * scheme.float_bytes if lin.bias else 0)


def outer_bytes(spec: ArchSpec, scheme: Scheme) -> tuple[int, int]:
    """(embeddings with any input/output projections, final norm + head) bytes: what sits outside the layers."""
    extra = sum(linear_bytes(lin, scheme, scheme.quantized) for lin in spec.extra_linears)
    head = spec.lm_head.params if spec.lm_head else 0  # a tied head is the embedding itself
    return spec.embedding_params * scheme.float_bytes + extra, (spec.final_norm_params + head) * scheme.float_bytes


def weights_bytes(spec: ArchSpec, scheme: Scheme) -> int:
    """Bytes of all parameters as loaded in `scheme` (`layer_bytes` per layer, `outer_bytes` around them).

    Embeddings, norms, routers, unquantized experts and the output head keep the floating-point width. Tied
    weights count once.
    """
    first, last = outer_bytes(spec, scheme)
    return first + last + sum(g.count * layer_bytes(g, scheme) for g in spec.groups)


def idle_expert_bytes(spec: ArchSpec, scheme: Scheme, batch: int = 1) -> int:
    """Bytes of routed experts a decode step need not read: with `batch` sequences each routed to `active` of
    `num_experts`, at most batch × active distinct experts per layer are read (a bound: routing may overlap)."""
    idle = 0
    for group in spec.groups:
        for experts in group.experts:
            read = min(experts.num_experts, (experts.active or experts.num_experts) * batch)
            quantized = scheme.quantized and experts_quantized(experts.fused_since_v4)
            one = sum(linear_bytes(lin, scheme, quantized) for lin in experts.linears)
            idle += group.count * (experts.num_experts - read) * one
    return idle


def unquantized_blocks(spec: ArchSpec, scheme: Scheme) -> list[tuple[str, int]]:
    """(name, parameters) of the large blocks a quantized scheme leaves 16-bit: fused experts."""
    if not scheme.quantized:
        return []
    blocks: dict[str, int] = {}
    for group in spec.groups:
        for experts in group.experts:
            if not experts_quantized(experts.fused_since_v4):
                blocks[experts.name] = blocks.get(experts.name, 0) + group.count * experts.params
    return list(blocks.items())


def kv_tokens(spec: ArchSpec, context: int) -> int:
    """Tokens the largest layer cache holds: the context, or the sliding window when every layer slides."""
    held = [c.tokens(context) for _, c in spec.caches if c.kind != "recurrent"]
    return max(held) if held else 0


def kv_cache_by_layer_type(spec: ArchSpec, context: int, batch: int, kv_bytes: int = 2,
                           state_bytes: int = 2) -> dict[str, int]:
    """Cache bytes per layer kind, as transformers' cache layers hold them (`CacheLayout.bytes`).

    Attention layers: 2 × kv_heads × head_dim × tokens × batch × kv_bytes, tokens capped at the window for
    sliding layers; MLA: the latent and rope widths; recurrent layers: a constant state per sequence.
    """
    split: dict[str, int] = {}
    for count, cache in spec.caches:
        split[cache.kind] = split.get(cache.kind, 0) + count * cache.bytes(context, batch, kv_bytes, state_bytes)
    return split


def kv_cache_bytes(spec: ArchSpec, context: int, batch: int, kv_bytes: int = 2, state_bytes: int = 2) -> int:
    """The whole cache at `context` tokens for `batch` sequences (`state_bytes`: the model's compute width)."""
    return sum(kv_cache_by_layer_type(spec, context, batch, kv_bytes, state_bytes).values())


def activation_bytes(spec: ArchSpec, tokens: int, batch: int, act_bytes: int) -> int:
    """Estimate of the widest layer's live activations during prefill of `tokens` tokens.

    The MLP's up, gate and product tensors (3 × intermediate) alive with four hidden-wide tensors: the residual
    stream, its normalized copy, the down projection's output and their sum (4 × hidden); layers run one at a time
    so only one layer's worth counts. NOTE: measured, not guessed: the peak of live tensors in a real Llama-style
    prefill (every allocation counted through a TorchDispatchMode, tests/test_estimates.py) is (4h + 3i) bytes per
    token and element width within 2%; the earlier 2 × hidden was 17% low on SmolLM2's shape.
    """
    return batch * tokens * (4 * spec.hidden_size + 3 * spec.intermediate_size) * act_bytes


def attention_scores_bytes(spec: ArchSpec, tokens: int, batch: int, act_bytes: int, attn_impl: str) -> int:
    """Eager attention materializes a tokens × tokens score matrix per head three times over at its softmax: the
    scores in the model's dtype, the float32 softmax, and its cast back (no cast for fp32), as transformers'
    eager_attention_forward writes it; plus the additive causal mask, batch × tokens² once (broadcast over heads).
    SDPA's flash and memory-efficient kernels never materialize it, so their extra memory is counted as zero."""
    if attn_impl == "sdpa":
        return 0
    per_score = act_bytes + 4 + (act_bytes if act_bytes != 4 else 0)
    return batch * tokens * tokens * (spec.num_heads * per_score + act_bytes)


def fits_on(total_bytes: int, gpu: GPU, margin: float = SAFETY_MARGIN) -> bool:
    """Whether `total_bytes` fits one `gpu` with the safety margin kept free."""
    return total_bytes <= gpu.memory_bytes * (1 - margin)


def plan_point(spec: ArchSpec, scheme: Scheme, context: int, batch: int, kv_dtype: str = KV_DTYPE_AUTO,
               attn_impl: str = "sdpa", device: str = "cuda", prefill_tokens: int | None = None) -> PlanRow:
    """Plan one model in one scheme at one context length and batch size.

    The KV cache holds `context` tokens; the prefill's transients (activations, eager scores) are sized for
    `prefill_tokens`, the whole context unless given (a run prefills its prompt, then decodes up to the context).
    """
    check_positive("context", context)
    check_positive("batch", batch)
    prefill = context if prefill_tokens is None else min(check_positive("prefill tokens", prefill_tokens), context)
    if attn_impl not in ATTN_IMPLS:
        raise UsageError(f"unknown attention implementation {attn_impl!r}. Choose from: {', '.join(ATTN_IMPLS)}")
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}. Choose from: {', '.join(DEVICES)}")
    act_bytes = compute_bytes(scheme)
    kv_dtype = kv_dtype_for(scheme, kv_dtype)
    warnings = list(spec.warnings) + scheme_warnings(spec, scheme)
    if spec.max_positions and context > spec.max_positions:
        warnings.append(f"context {context} exceeds the model's {spec.max_positions} positions")
    if spec.sliding_window and context > spec.sliding_window:
        warnings.append(f"sliding window: those layers hold {spec.sliding_window} of the {context} tokens")
    split = kv_cache_by_layer_type(spec, context, batch, kv_dtype_bytes(kv_dtype), act_bytes)
    row = PlanRow(
        model=spec.name, dtype=scheme.name, context=context, batch=batch, kv_dtype=kv_dtype,
        attention=spec.attention, kv_heads=spec.num_kv_heads, params=spec.param_count,
        weights_bytes=weights_bytes(spec, scheme), kv_cache_bytes=sum(split.values()),
        cuda_context_bytes=CUDA_CONTEXT_BYTES if device == "cuda" else 0,
        activation_bytes=activation_bytes(spec, prefill, batch, act_bytes),
        attention_scores_bytes=attention_scores_bytes(spec, prefill, batch, act_bytes, attn_impl),
        logits_bytes=batch * LOGITS_POSITIONS_IN_GENERATE * spec.vocab_size * (act_bytes + LOGITS_COPY_BYTES_PER_ELEMENT),
        attn_impl=attn_impl, device=device, quantized_params=quantized_params(spec, scheme),
        kv_cache_by_layer_type=split, exactness=spec.exactness,
        unquantized_params=sum(n for _, n in unquantized_blocks(spec, scheme)), warnings=tuple(warnings),
    )
    fitting = (g.name for g in gpu_profiles() if runs_dtype(g, scheme.name) and fits_on(row.total_bytes, g))
    return replace(row, fits_gpus=tuple(fitting))


def scheme_warnings(spec: ArchSpec, scheme: Scheme) -> list[str]:
    """What a quantized scheme leaves unquantized, named, with its share of the parameters."""
    warnings = []
    for name, params in unquantized_blocks(spec, scheme):
        share = params / spec.param_count
        warnings.append(f"{scheme.name}: {name} ({params / 1e9:.2f}B parameters, {share:.0%}) stay "
                        f"{'bf16' if scheme.torch_dtype == 'bfloat16' else 'fp16'}: transformers 5 fuses the experts "
                        "into 3-D parameters and bitsandbytes quantizes only nn.Linear (bitsandbytes #1849)")
    return warnings


def check_positive(name: str, value: object) -> int:
    """The one positive-integer check of every count the API and CLI take."""
    if not positive_int(value):
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return value


SEED_MODELS = ("falcon-7b", "llama-7b", "mpt-7b", "stablelm-base-alpha-7b", "llama-33b", "llama-65b", "falcon-40b")


def plan(models: Iterable[str] = SEED_MODELS, dtypes: Iterable[str] = ("bf16",), contexts: Iterable[int] = (2048,),
         batches: Iterable[int] = (1,), kv_dtype: str = KV_DTYPE_AUTO, attn_impl: str = "sdpa",
         device: str = "cuda", device_map: str | None = None,
         max_memory: dict[str, int] | None = None) -> list[PlanRow]:
    """Plan the cross product of models × dtypes × contexts × batches (the seed table by default); under a
    `device_map` with its `max_memory` budgets, each row says where its layers go (`placement.plan_placement`)."""
    from .placement import check_plan_budgets, plan_placement

    check_plan_budgets(device_map, max_memory, device)
    specs = [resolve_model(m).spec() for m in models]
    schemes = [get_scheme(d) for d in dtypes]
    for scheme in schemes:
        kv_dtype_for(scheme, kv_dtype)
    contexts, batches = [check_positive("context", c) for c in contexts], [check_positive("batch", b) for b in batches]
    placements = {(spec.name, scheme.name): plan_placement(spec, scheme, device_map, max_memory)
                  for spec in specs for scheme in schemes} if device_map else {}
    return [replace(plan_point(spec, scheme, c, b, kv_dtype, attn_impl, device),
                    placement=placements.get((spec.name, scheme.name)))
            for spec in specs for scheme in schemes for c in contexts for b in batches]
