"""The planner: exact weights and KV-cache bytes, and documented estimates of the runtime around them.

Everything is integer bytes. Weights and KV cache are exact for the layouts in `spec.py`; the runtime parts
(CUDA context, prefill activations, attention scores, logits) are estimates until `falconbench run` measures
them, and are labelled as such wherever they are shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Literal

from .errors import UsageError
from .gpus import GPU, gpu_profiles, runs_dtype
from .schemes import KV_DTYPE_AUTO, Scheme, cache_dtype, get_scheme, kv_dtype_bytes
from .sources import resolve_model
from .spec import ArchSpec

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
LOGITS_BYTES_PER_ELEMENT = 4  # transformers upcasts logits to float32
# During generate, prefill computes logits for the last position only (transformers' `logits_to_keep=1`).
LOGITS_POSITIONS_IN_GENERATE = 1


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
    warnings: tuple[str, ...] = field(default=())
    fits_gpus: tuple[str, ...] = field(default=())

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
        return row


def weights_bytes(spec: ArchSpec, scheme: Scheme) -> int:
    """Bytes of all parameters as loaded in `scheme`.

    bitsandbytes (through transformers) replaces the decoder's linear layers only; embeddings, norms, biases
    and the output head keep the floating-point width. Tied weights count once.
    """
    floating = (spec.embedding_params + spec.final_norm_params + spec.num_layers * spec.layer_norm_params
                + (spec.lm_head.params if spec.lm_head else 0))
    per_layer_weights = sum(scheme.linear_weight_bytes(lin.in_features, lin.out_features)
                            for lin in spec.layer_linears)
    per_layer_bias = sum(lin.out_features for lin in spec.layer_linears if lin.bias)
    return (floating + spec.num_layers * per_layer_bias) * scheme.float_bytes + spec.num_layers * per_layer_weights


def kv_tokens(spec: ArchSpec, context: int) -> int:
    """Tokens the cache holds: the context, or the sliding window when the model attends to a window only."""
    return min(context, spec.sliding_window) if spec.sliding_window else context


def kv_cache_bytes(spec: ArchSpec, context: int, batch: int, kv_bytes: int = 2) -> int:
    """K and V for every layer: 2 × layers × kv_heads × head_dim × tokens × batch × bytes per element."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * kv_tokens(spec, context) * batch * kv_bytes


def activation_bytes(spec: ArchSpec, tokens: int, batch: int, act_bytes: int) -> int:
    """Estimate of the widest layer's live activations during prefill of `tokens` tokens.

    The residual stream and its normalized copy (2 × hidden), plus the MLP's up, gate and product tensors
    (3 × intermediate), alive together; layers run one at a time so only one layer's worth counts.
    """
    return batch * tokens * (2 * spec.hidden_size + 3 * spec.intermediate_size) * act_bytes


def attention_scores_bytes(spec: ArchSpec, tokens: int, batch: int, act_bytes: int, attn_impl: str) -> int:
    """Eager attention materializes a tokens × tokens score matrix per head (float32 softmax plus its cast);
    SDPA's flash and memory-efficient kernels never do, so their extra memory is counted as zero."""
    if attn_impl == "sdpa":
        return 0
    return batch * spec.num_heads * tokens * tokens * (4 + act_bytes)


def fits_on(total_bytes: int, gpu: GPU, margin: float = SAFETY_MARGIN) -> bool:
    """Whether `total_bytes` fits one `gpu` with the safety margin kept free."""
    return total_bytes <= gpu.memory_bytes * (1 - margin)


def plan_point(spec: ArchSpec, scheme: Scheme, context: int, batch: int, kv_dtype: str = KV_DTYPE_AUTO,
               attn_impl: str = "sdpa", device: str = "cuda") -> PlanRow:
    """Plan one model in one scheme at one context length and batch size."""
    check_positive("context", context)
    check_positive("batch", batch)
    if attn_impl not in ATTN_IMPLS:
        raise UsageError(f"unknown attention implementation {attn_impl!r}. Choose from: {', '.join(ATTN_IMPLS)}")
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}. Choose from: {', '.join(DEVICES)}")
    act_bytes = 4 if scheme.torch_dtype == "float32" else 2
    kv_dtype = cache_dtype(scheme, kv_dtype)
    warnings = list(spec.warnings)
    if spec.max_positions and context > spec.max_positions:
        warnings.append(f"context {context} exceeds the model's {spec.max_positions} positions")
    if spec.sliding_window and context > spec.sliding_window:
        warnings.append(f"KV cache capped at the {spec.sliding_window}-token sliding window")
    row = PlanRow(
        model=spec.name, dtype=scheme.name, context=context, batch=batch, kv_dtype=kv_dtype,
        attention=spec.attention, kv_heads=spec.num_kv_heads, params=spec.param_count,
        weights_bytes=weights_bytes(spec, scheme),
        kv_cache_bytes=kv_cache_bytes(spec, context, batch, kv_dtype_bytes(kv_dtype)),
        cuda_context_bytes=CUDA_CONTEXT_BYTES if device == "cuda" else 0,
        activation_bytes=activation_bytes(spec, context, batch, act_bytes),
        attention_scores_bytes=attention_scores_bytes(spec, context, batch, act_bytes, attn_impl),
        logits_bytes=batch * LOGITS_POSITIONS_IN_GENERATE * spec.vocab_size * LOGITS_BYTES_PER_ELEMENT,
        attn_impl=attn_impl, device=device, warnings=tuple(warnings),
    )
    fitting = (g.name for g in gpu_profiles() if runs_dtype(g, scheme.name) and fits_on(row.total_bytes, g))
    return replace(row, fits_gpus=tuple(fitting))


def check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return value


SEED_MODELS = ("falcon-7b", "llama-7b", "mpt-7b", "stablelm-base-alpha-7b", "llama-33b", "llama-65b", "falcon-40b")


def plan(models: Iterable[str] = SEED_MODELS, dtypes: Iterable[str] = ("bf16",), contexts: Iterable[int] = (2048,),
         batches: Iterable[int] = (1,), kv_dtype: str = KV_DTYPE_AUTO, attn_impl: str = "sdpa",
         device: str = "cuda") -> list[PlanRow]:
    """Plan the cross product of models × dtypes × contexts × batches (the seed table by default)."""
    specs = [resolve_model(m).spec() for m in models]
    schemes = [get_scheme(d) for d in dtypes]
    if kv_dtype != KV_DTYPE_AUTO:
        kv_dtype_bytes(kv_dtype)
    contexts, batches = [check_positive("context", c) for c in contexts], [check_positive("batch", b) for b in batches]
    return [plan_point(spec, scheme, c, b, kv_dtype, attn_impl, device)
            for spec in specs for scheme in schemes for c in contexts for b in batches]
