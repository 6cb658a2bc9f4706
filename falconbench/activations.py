"""Activations a training step saves for backward: an estimate, term by term, from the architecture. No torch.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1) count
s·b·h·(34 + 5·a·s/h) bytes per GPT layer in 16 bits with dropout, and 2·s·b·h with full recomputation. Here the
same count is written per tensor, with the rules that decide what autograd really keeps under transformers:
- a linear keeps its input only when its weight trains; a frozen base keeps less than full fine-tuning;
- no dropout (lora_dropout 0; Falcon and Llama train without it);
- SDPA's flash kernel keeps q, k, v, the output and an fp32 log-sum-exp per head, no score matrix; but Falcon's
  multi-query layers hand SDPA one K,V head for many query heads without `enable_gqa`, which no fused kernel takes,
  so torch's math path runs and keeps the a·s² probabilities (in fp32 on CPU, where it upcasts 16-bit inputs);
- RMSNorm keeps an fp32 copy of its input; LayerNorm keeps its input and two statistics per token;
- LoRA's lora_A keeps its input cast to the adapter's fp32 (one copy per adapter, shared only when the input is
  fp32 already), lora_B keeps r values per token (peft `tuners/lora/layer.py`);
- autocast casts each linear's fp32 input to 16 bits separately (it caches weights, not activations).
Checked tensor by tensor against `torch.autograd.graph.saved_tensors_hooks` by `falconbench run --task finetune`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from .schemes import FP32
from .spec import ArchSpec, Linear

if TYPE_CHECKING:
    from .finetune import FinetuneSetup

OUT_PROJECTIONS = ("o_proj", "dense", "out_proj")  # read the attention output, not a norm
DOWN_PROJECTIONS = ("down_proj", "dense_4h_to_h", "fc2", "fc_out")  # read the MLP's activation
INT64 = 8


def widths(setup: "FinetuneSetup") -> tuple[int, int]:
    """(residual stream, matmul operand) bytes per element. lora: the base dtype for both. qlora: fp32 for both,
    since prepare_model_for_kbit_training makes embeddings and norms fp32 and Linear4bit returns its input's dtype.
    Full fine-tuning under autocast: an fp32 residual (fp32 parameters), 16-bit matmuls."""
    if setup.method == "qlora":
        return FP32, FP32
    base = setup.scheme.float_bytes
    return (FP32, base) if setup.mixed_precision else (base, base)


def is_gated(spec: ArchSpec) -> bool:
    """A SwiGLU MLP (gate, up, down) with RMSNorms, as Llama's; otherwise a GPT-style GELU MLP with LayerNorms."""
    return any(lin.name.endswith("gate_proj") for lin in spec.layer_linears)


def norm_count(spec: ArchSpec) -> int:
    """Norms per decoder layer, from their parameters: RMSNorm (and MPT's LayerNorm) has a weight of `hidden`,
    a biased LayerNorm twice that."""
    width = spec.hidden_size if is_gated(spec) or spec.model_type == "mpt" else 2 * spec.hidden_size
    return max(1, spec.layer_norm_params // width)


def role(lin: Linear) -> str:
    """What a linear reads: "attn" and "mlp" read a norm's output, "out" the attention, "down" the activation."""
    last = lin.name.rsplit(".", 1)[-1]
    if last == "c_proj":  # GPT-2 names both projections back to the residual c_proj
        return "out" if lin.name.startswith("attn") else "down"
    if last in OUT_PROJECTIONS:
        return "out"
    if last in DOWN_PROJECTIONS:
        return "down"
    return "attn" if lin.name.split(".")[0] in ("self_attn", "self_attention", "attention", "attn") else "mlp"


def input_elements(spec: ArchSpec, linears: Iterable[Linear], shared: bool) -> int:
    """Elements per token of the inputs these linears keep: one tensor per group that reads the same input when
    `shared` (no cast in between), one per linear otherwise. A single norm feeds both attention and MLP."""
    linears = list(linears)
    if not shared:
        return sum(lin.in_features for lin in linears)
    one_norm = norm_count(spec) == 1
    groups = {("attn" if one_norm and role(lin) == "mlp" else role(lin)): lin.in_features for lin in linears}
    return sum(groups.values())


def math_attention(spec: ArchSpec) -> bool:
    """Falcon's multi-query layers (not the new decoder architecture, which expands K,V to every head)."""
    return spec.model_type == "falcon" and 1 == spec.num_kv_heads < spec.num_heads


def attention_bytes_per_token(spec: ArchSpec, setup: "FinetuneSetup", device: str) -> int:
    _, mm = widths(setup)
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    if math_attention(spec):  # q, k, v and the softmax probabilities (a × s per token)
        width = FP32 if device == "cpu" else mm
        return width * (h + 2 * kv + spec.num_heads * setup.seq_len)
    if spec.model_type == "falcon":
        kv = h  # the new decoder architecture broadcasts K,V to every query head before SDPA
    return mm * (h + 2 * kv + h) + FP32 * spec.num_heads


def layer_bytes_per_token(spec: ArchSpec, setup: "FinetuneSetup", device: str) -> int:
    """Bytes one decoder layer saves for backward, per token, without checkpointing."""
    res, mm = widths(setup)
    h, f = spec.hidden_size, spec.intermediate_size
    trains_base = not setup.adapters
    # RMSNorm: an fp32 copy of the input and the rsqrt, the normed tensor if its weight trains; LayerNorm: its
    # input, mean and rstd. The MLP: SiLU's input and both factors of the product, or GELU's input.
    norms = norm_count(spec) * norm_bytes_per_token(spec, setup)
    mlp = mm * (3 if is_gated(spec) else 1) * f
    linear_inputs = mm * input_elements(spec, spec.layer_linears, shared=res == mm) if trains_base else 0
    return norms + attention_bytes_per_token(spec, setup, device) + mlp + linear_inputs \
        + adapter_bytes_per_token(spec, setup)


def adapter_bytes_per_token(spec: ArchSpec, setup: "FinetuneSetup") -> int:
    if not setup.adapters:
        return 0
    from .finetune import targeted_linears

    _, mm = widths(setup)
    linears = targeted_linears(spec, setup.lora_targets)
    return FP32 * input_elements(spec, linears, shared=mm == FP32) + FP32 * setup.lora_r * len(linears)


def norm_bytes_per_token(spec: ArchSpec, setup: "FinetuneSetup") -> int:
    """One norm's saved tensors (see layer_bytes_per_token)."""
    res, _ = widths(setup)
    h = spec.hidden_size
    if is_gated(spec):
        return FP32 * h + FP32 + (0 if setup.adapters else res * h)
    return res * (h + 2)


def outside_bytes_per_token(spec: ArchSpec, setup: "FinetuneSetup") -> int:
    """The final norm's saved tensors, the rotary cos/sin (shared by every layer, kept once, none when the layers
    are checkpointed: they reach the layers as keyword arguments), and with full fine-tuning the head's input and
    the embedding's indices."""
    res, mm = widths(setup)
    rotary_family = spec.model_type in ("falcon", "llama", "mistral", "qwen2")
    rotary = 2 * spec.head_dim * res if rotary_family and not setup.gradient_checkpointing else 0
    outside = norm_bytes_per_token(spec, setup) + rotary
    return outside if setup.adapters else outside + mm * spec.hidden_size + INT64


def first_layer_savings_per_token(spec: ArchSpec, setup: "FinetuneSetup") -> int:
    """What the first layer does not save when nothing before it needs a gradient: adapters on a frozen embedding
    without checkpointing (checkpointing makes the embedding's output require grad, `enable_input_require_grads`).
    Its input norm keeps nothing, and with one norm shared by attention and MLP (Falcon), neither does an MLP that
    holds no adapter."""
    if not setup.adapters or setup.gradient_checkpointing:
        return 0
    from .finetune import targeted_linears

    savings = norm_bytes_per_token(spec, setup)
    mlp_adapted = any(role(lin) in ("mlp", "down") for lin in targeted_linears(spec, setup.lora_targets))
    if norm_count(spec) == 1 and not mlp_adapted:
        _, mm = widths(setup)
        savings += mm * spec.intermediate_size * (3 if is_gated(spec) else 1)
    return savings


def activation_bytes(spec: ArchSpec, setup: "FinetuneSetup", device: str) -> int:
    """Saved over the whole model. With checkpointing (transformers checkpoints each decoder layer), only each
    layer's input stays: Korthikanti's "full recomputation", 2·s·b·h in 16 bits."""
    res, _ = widths(setup)
    per_layer = res * spec.hidden_size if setup.gradient_checkpointing else layer_bytes_per_token(spec, setup, device)
    per_token = spec.num_layers * per_layer - first_layer_savings_per_token(spec, setup) \
        + outside_bytes_per_token(spec, setup)
    return setup.seq_len * setup.batch * per_token


def recompute_bytes(spec: ArchSpec, setup: "FinetuneSetup", device: str) -> int:
    """With checkpointing, backward recomputes one layer at a time: one layer's saved set lives at once (and under
    autocast, that layer's 16-bit weight copies)."""
    if not setup.gradient_checkpointing:
        return 0
    copies = sum(lin.params for lin in spec.layer_linears) * setup.scheme.float_bytes if setup.mixed_precision else 0
    return setup.seq_len * setup.batch * layer_bytes_per_token(spec, setup, device) + copies
