"""Planning a fine-tune: LoRA, QLoRA and full fine-tuning, component by component, in bytes. No torch.

Exact (counted from the spec's layout): the frozen base weights in their scheme, the trainable parameters
(r × (in + out) per targeted linear), their gradients, the optimizer states, the 16-bit weight copies of mixed
precision and the adapter's tensor bytes on disk. Estimated (a formula, checked against `falconbench run --task
finetune` or against torch itself): the optimizer step's temporaries, the activations saved for backward and the
logits around the loss. COMPONENTS below is the one list of these components, their order and their names.

What each method is, as `falconbench run --task finetune` runs it:
- lora: the base in `--dtype` (bf16/fp16/fp32), frozen; peft adapters in fp32 (peft's `autocast_adapter_dtype`
  default), lora_dropout 0, no autocast.
- qlora: the base's linears in 4-bit (`--dtype` nf4, nf4-dq for double quantization, or fp4), bf16 compute,
  through peft's `prepare_model_for_kbit_training`, which casts every other parameter (embeddings, norms, head,
  biases) to fp32, so the residual stream is fp32 too (peft `utils/other.py`).
- full: every parameter trains. With --dtype bf16/fp16 this is mixed precision as `torch.autocast` (and HF
  Trainer's bf16=True) does it: the parameters are the fp32 master copy, autocast makes 16-bit copies of the
  matmul weights that backward keeps; with fp32 there is no copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

from . import activations
from .errors import UsageError
from .planner import CUDA_CONTEXT_BYTES, DEVICES, check_positive, weights_bytes
from .results import TASKS  # noqa: F401  (the CLI's --task choices: the results file's vocabulary)
from .schemes import FP32, Scheme, get_scheme
from .spec import ArchSpec, Linear

METHODS: tuple[str, ...] = ("lora", "qlora", "full")
METHOD_DTYPES: dict[str, tuple[str, ...]] = {"lora": ("bf16", "fp16", "fp32"), "qlora": ("nf4", "nf4-dq", "fp4"),
                                             "full": ("bf16", "fp16", "fp32")}
DEFAULT_DTYPE = {"lora": "bf16", "qlora": "nf4", "full": "bf16"}
ALL_LINEAR = "all-linear"
DEFAULT_LORA_R = 16
ADAPTER_BYTES_PER_PARAM = FP32  # peft keeps (and saves) adapters in fp32 unless told otherwise

# peft's default LoRA targets per model type (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
# peft 0.21; tests/test_finetune.py checks every entry against the installed peft).
PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bloom": ("query_key_value",), "falcon": ("query_key_value",), "gpt_neox": ("query_key_value",),
    "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"), "gemma3_text": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",), "gptj": ("q_proj", "v_proj"), "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "mpt": ("Wqkv",), "opt": ("q_proj", "v_proj"), "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"),
}

# bitsandbytes 8-bit optimizers (bnb 0.50 optim/optimizer.py Optimizer2State.init_state): tensors of at least
# `min_8bit_size` elements keep each moment as uint8 plus one fp32 absmax per 256-element block; smaller ones fp32.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIMIZER_BLOCK = 256


@dataclass(frozen=True)
class Optimizer:
    """An optimizer and the state it keeps per trainable tensor."""

    name: str
    moments: int  # state tensors per parameter tensor
    eight_bit: bool = False
    paged: bool = False
    torch_adam: bool = False  # torch.optim.AdamW: its step allocates temporaries (step_temporary_bytes)
    description: str = ""

    def state_bytes(self, numel: int, param_bytes: int) -> int:
        """Bytes of state for one parameter tensor of `numel` elements stored with `param_bytes` each."""
        if not self.eight_bit:
            return self.moments * numel * param_bytes  # torch: zeros_like(param), the parameter's dtype
        if numel < BNB_MIN_8BIT_SIZE:
            return self.moments * numel * FP32
        return self.moments * (numel + -(-numel // BNB_OPTIMIZER_BLOCK) * FP32)


OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (
    Optimizer("adamw", 2, torch_adam=True,
              description="torch.optim.AdamW: exp_avg and exp_avg_sq in the parameter's dtype"),
    Optimizer("adamw-8bit", 2, eight_bit=True, description="bitsandbytes AdamW8bit: blockwise 8-bit moments"),
    Optimizer("paged-adamw-8bit", 2, eight_bit=True, paged=True,
              description="bitsandbytes PagedAdamW8bit: 8-bit moments in CUDA managed memory"),
    Optimizer("sgd", 0, description="torch.optim.SGD without momentum: no state"),
)}


def step_temporary_bytes(optimizer: Optimizer, sizes: list[int], param_bytes: int, device: str) -> int:
    """The tensors `optimizer.step()` allocates beside the weights, gradients and state it updates (torch 2.13
    optim/adam.py, which AdamW runs; fused is never its default: `_default_to_fused_or_foreach(..., use_fused=False)`).

    - CUDA: the foreach implementation, the default for CUDA tensors, allocates `exp_avg_sq_sqrt =
      torch._foreach_sqrt(device_exp_avg_sqs)`: one temporary per trainable tensor, all alive together until the
      parameters' `_foreach_addcdiv_` (every other foreach call there works in place): one more moment's bytes.
    - CPU: the single-tensor loop (foreach covers CUDA-like devices only, optimizer.py) computes `denom =
      (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`, holding one tensor's square root and quotient while
      the previous tensor's `denom` is still bound: 2·s_i + s_(i−1) bytes at most, which this bounds by twice the
      largest tensor plus the next largest (the parameters' order is the model's, not known here).

    SGD without momentum (in-place `add_`) and bitsandbytes' 8-bit optimizers (one fused kernel per tensor) allocate
    none. tests/test_finetune.py counts torch's live tensors during step() with foreach on and off against this."""
    if not optimizer.torch_adam or not sizes:
        return 0
    if device == "cuda":
        return sum(sizes) * param_bytes
    largest = sorted(sizes, reverse=True)[:2]
    return (2 * largest[0] + sum(largest[1:])) * param_bytes


def get_optimizer(name: str) -> Optimizer:
    optimizer = OPTIMIZERS.get(name.strip().lower())
    if optimizer is None:
        raise UsageError(f"unknown optimizer {name!r}. Choose from: {', '.join(OPTIMIZERS)}")
    return optimizer


@dataclass(frozen=True)
class FinetuneSetup:
    """One fine-tuning configuration, validated on creation."""

    method: str = "lora"
    dtype: str | None = None  # None: the method's default
    lora_r: int = DEFAULT_LORA_R
    lora_targets: tuple[str, ...] | None = None  # None: peft's default for the model type
    seq_len: int = 512
    batch: int = 1
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"unknown fine-tuning method {self.method!r}. Choose from: {', '.join(METHODS)}")
        if self.dtype is None:
            object.__setattr__(self, "dtype", DEFAULT_DTYPE[self.method])
        object.__setattr__(self, "dtype", get_scheme(self.dtype).name)
        if self.dtype not in METHOD_DTYPES[self.method]:
            raise UsageError(f"--method {self.method} takes --dtype {', '.join(METHOD_DTYPES[self.method])}, not "
                             f"{self.dtype}" + (". A 4-bit base is --method qlora" if self.method != "qlora" else ""))
        for name in ("lora_r", "seq_len", "batch"):
            check_positive(name.replace("_", "-"), getattr(self, name))
        get_optimizer(self.optimizer)
        if self.lora_targets is not None and not self.lora_targets:
            raise UsageError("--lora-targets is empty. Name modules (e.g. q_proj,v_proj) or pass all-linear")

    @property
    def scheme(self) -> Scheme:
        return get_scheme(self.dtype)

    @property
    def adapters(self) -> bool:
        return self.method != "full"

    @property
    def mixed_precision(self) -> bool:
        """Full fine-tuning with a 16-bit dtype: fp32 parameters under autocast."""
        return self.method == "full" and self.scheme.float_bytes == 2


def default_targets(spec: ArchSpec) -> tuple[str, ...]:
    targets = PEFT_DEFAULT_TARGETS.get(spec.model_type)
    if targets is None:
        raise UsageError(f"peft has no default LoRA targets falconbench knows for model type {spec.model_type!r}. "
                         f"Pass --lora-targets (module names, e.g. {spec.layer_linears[0].name.split('.')[-1]}) or "
                         f"{ALL_LINEAR}")
    return targets


def targeted_linears(spec: ArchSpec, targets: tuple[str, ...] | None) -> tuple[Linear, ...]:
    """The decoder layer's linears LoRA adapts: peft's rule, a name matches a module's full name or its suffix
    after a dot; `all-linear` is every linear but the output head (peft `_maybe_include_all_linear_layers`)."""
    targets = targets or default_targets(spec)
    if ALL_LINEAR in targets:
        return spec.layer_linears
    chosen = tuple(lin for lin in spec.layer_linears
                   if any(lin.name == t or lin.name.endswith("." + t) for t in targets))
    unknown = [t for t in targets if not any(lin.name == t or lin.name.endswith("." + t) for lin in spec.layer_linears)]
    if unknown:
        names = ", ".join(lin.name.split(".")[-1] for lin in spec.layer_linears)
        raise UsageError(f"--lora-targets {', '.join(unknown)} matches no linear of {spec.name}. Its linears: {names}, "
                         f"or {ALL_LINEAR}")
    return chosen


def lora_tensor_sizes(spec: ArchSpec, setup: FinetuneSetup) -> list[int]:
    """Elements of each adapter tensor: per targeted linear per layer, A (r × in) and B (out × r) (LoRA, Hu et al.
    2021 §4; peft `LoraLayer.update_layer`)."""
    per_layer = [n for lin in targeted_linears(spec, setup.lora_targets)
                 for n in (setup.lora_r * lin.in_features, lin.out_features * setup.lora_r)]
    return per_layer * spec.num_layers


def full_tensor_sizes(spec: ArchSpec) -> list[int]:
    """Elements of every parameter tensor of the model (tied head counted once)."""
    hidden, layers = spec.hidden_size, spec.num_layers
    sizes = [spec.embedding_params, spec.final_norm_params] + ([spec.lm_head.params] if spec.lm_head else [])
    per_layer = [lin.in_features * lin.out_features for lin in spec.layer_linears]
    per_layer += [lin.out_features for lin in spec.layer_linears if lin.bias]
    # Norm parameters as vectors of `hidden` (weight, and bias where the family has one).
    per_layer += [hidden] * (spec.layer_norm_params // hidden)
    return sizes + per_layer * layers


def trainable_tensor_sizes(spec: ArchSpec, setup: FinetuneSetup) -> list[int]:
    return lora_tensor_sizes(spec, setup) if setup.adapters else full_tensor_sizes(spec)


def frozen_weights_bytes(spec: ArchSpec, setup: FinetuneSetup) -> int:
    """The frozen base: none for full fine-tuning; the base in its dtype for lora; for qlora, the 4-bit linears plus
    every other parameter in fp32 (what prepare_model_for_kbit_training leaves)."""
    if setup.method == "full":
        return 0
    scheme = setup.scheme
    if setup.method == "lora":
        return weights_bytes(spec, scheme)
    quantized = spec.num_layers * sum(scheme.linear_weight_bytes(lin.in_features, lin.out_features)
                                      for lin in spec.layer_linears)
    linear_weights = spec.num_layers * sum(lin.in_features * lin.out_features for lin in spec.layer_linears)
    return quantized + (spec.param_count - linear_weights) * FP32


def trainable_bytes_per_param(setup: FinetuneSetup) -> int:
    """Adapters are fp32 (peft's default); full fine-tuning trains the parameters in fp32 (the master copy under
    mixed precision) or in --dtype fp32."""
    return ADAPTER_BYTES_PER_PARAM if setup.adapters else FP32


def weight_copy_bytes(spec: ArchSpec, setup: FinetuneSetup) -> int:
    """Mixed precision's 16-bit copies of every matmul weight (and bias), made by autocast in the forward and kept
    for backward: the decoder's linears and the head (the embedding matrix again when the head is tied). A
    checkpointed forward keeps none inside the layers; each layer's come back with its recomputation."""
    if not setup.mixed_precision:
        return 0
    head = spec.lm_head.params if spec.lm_head else spec.vocab_size * spec.hidden_size
    layers = 0 if setup.gradient_checkpointing else spec.linear_params
    return (layers + head) * setup.scheme.float_bytes


def logits_bytes(spec: ArchSpec, setup: FinetuneSetup) -> tuple[int, int]:
    """(logits, the fp32 log-softmax output the loss keeps and its int64 targets; their fp32 gradient): batch × seq
    × vocab each.

    The logits come out in the head's dtype (fp32 after qlora's prepare; 16-bit under autocast or a 16-bit base);
    transformers' ForCausalLMLoss upcasts them to fp32 and cross-entropy keeps its log-softmax (loss_utils.py).
    """
    positions = setup.seq_len * setup.batch * spec.vocab_size
    head_bytes = FP32 if setup.method == "qlora" else setup.scheme.float_bytes
    targets = setup.seq_len * setup.batch * activations.INT64
    return positions * (head_bytes + FP32) + targets, positions * FP32


@dataclass(frozen=True)
class FinetuneRow:
    """One fine-tuning plan point, each component in bytes."""

    model: str
    method: str
    dtype: str
    seq_len: int
    batch: int
    lora_r: int | None
    lora_targets: tuple[str, ...]
    optimizer: str
    gradient_checkpointing: bool
    device: str
    params: int
    trainable_params: int
    frozen_weights_bytes: int
    trainable_bytes: int
    weight_copy_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    step_temporary_bytes: int
    activation_bytes: int
    recompute_bytes: int
    logits_bytes: int
    logits_grad_bytes: int
    cuda_context_bytes: int
    adapter_bytes: int | None  # tensor bytes of the saved adapter (the safetensors file adds its header); None: full
    task: str = "finetune"
    warnings: tuple[str, ...] = field(default=())

    @property
    def phase_peaks(self) -> dict[str, int]:
        return phase_peak_bytes({c.name: getattr(self, c.name) for c in COMPONENTS})

    @property
    def total_bytes(self) -> int:
        """The step's peak: the highest of its phases' (PHASE_COMPONENTS), the start of backward unless the
        optimizer step's temporaries beside weights, gradients and state outgrow it."""
        return max(self.phase_peaks.values())

    def as_dict(self) -> dict:
        row = asdict(self)
        row["lora_targets"] = list(self.lora_targets)
        row["warnings"] = list(self.warnings)
        row["total_bytes"] = self.total_bytes
        row["phase_peak_bytes"] = self.phase_peaks
        return row


@dataclass(frozen=True)
class Component:
    """One part of a fine-tune's memory: its FinetuneRow field (and measured row key), the line the plan and the
    report give it, the column header of the report's Δplan table, whether the plan counts it exactly, and whether
    the report shows it per setup (the CUDA context is only ever measured inside a phase's peak)."""

    name: str
    label: str
    short: str
    exact: bool
    reported: bool = True


# In the order a step allocates them.
COMPONENTS: tuple[Component, ...] = (
    Component("frozen_weights_bytes", "Frozen weights", "Frozen", True),
    Component("trainable_bytes", "Trainable params", "Trainable", True),
    Component("weight_copy_bytes", "16-bit copies", "Copies", True),
    Component("gradient_bytes", "Gradients", "Grads", True),
    Component("optimizer_bytes", "Optimizer states", "Optimizer", True),
    Component("step_temporary_bytes", "Step temporaries", "Step tmp", False),
    Component("activation_bytes", "Activations", "Activ.", False),
    Component("recompute_bytes", "Recompute", "Recomp.", False),
    Component("logits_bytes", "Logits", "Logits", False),
    Component("logits_grad_bytes", "Logits grad", "Logits grad", False),
    Component("cuda_context_bytes", "CUDA context", "CUDA ctx", False, reported=False),
)
EXACT: tuple[str, ...] = tuple(c.name for c in COMPONENTS if c.exact)
ESTIMATED: tuple[str, ...] = tuple(c.name for c in COMPONENTS if not c.exact)


# A training step's phases, in the order they run (train/measure.py tracks each one's peak).
PHASES: tuple[str, ...] = ("forward", "backward", "optimizer")
# What is alive at each phase's peak, by FinetuneRow field: the forward ends holding the weights, the optimizer
# state kept from the last step, the saved activations and the logits around the loss; backward starts with all
# of it plus the logits' gradient and fills the gradients; the optimizer step holds weights, gradients, state and
# its own temporaries once the saved tensors are freed. The plan's total is the highest of the three.
PHASE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "forward": ("frozen_weights_bytes", "trainable_bytes", "weight_copy_bytes", "optimizer_bytes", "activation_bytes",
                "logits_bytes", "cuda_context_bytes"),
    "backward": tuple(name for name in EXACT + ESTIMATED if name != "step_temporary_bytes"),
    "optimizer": ("frozen_weights_bytes", "trainable_bytes", "gradient_bytes", "optimizer_bytes",
                  "step_temporary_bytes", "cuda_context_bytes"),
}


def phase_peak_bytes(components: Mapping[str, int]) -> dict[str, int]:
    """The planned peak of each phase: the sum of the components PHASE_COMPONENTS says are alive then."""
    return {phase: sum(components[name] for name in names) for phase, names in PHASE_COMPONENTS.items()}


def plan_finetune_point(spec: ArchSpec, setup: FinetuneSetup, device: str = "cuda") -> FinetuneRow:
    """Plan one fine-tune of one model."""
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}. Choose from: {', '.join(DEVICES)}")
    refuse_unplannable(spec)
    sizes = trainable_tensor_sizes(spec, setup)
    trainable = sum(sizes)
    per_param = trainable_bytes_per_param(setup)
    optimizer = get_optimizer(setup.optimizer)
    logits, logits_grad = logits_bytes(spec, setup)
    targets = tuple(lin.name.split(".")[-1] for lin in targeted_linears(spec, setup.lora_targets)) \
        if setup.adapters else ()
    warnings = list(spec.warnings)
    if spec.max_positions and setup.seq_len > spec.max_positions:
        warnings.append(f"sequence {setup.seq_len} exceeds the model's {spec.max_positions} positions")
    if optimizer.paged:
        warnings.append("paged optimizer state lives in CUDA managed memory, outside torch's counters")
    return FinetuneRow(
        model=spec.name, method=setup.method, dtype=setup.dtype, seq_len=setup.seq_len, batch=setup.batch,
        lora_r=setup.lora_r if setup.adapters else None, lora_targets=targets, optimizer=optimizer.name,
        gradient_checkpointing=setup.gradient_checkpointing, device=device, params=spec.param_count,
        trainable_params=trainable, frozen_weights_bytes=frozen_weights_bytes(spec, setup),
        trainable_bytes=trainable * per_param, weight_copy_bytes=weight_copy_bytes(spec, setup),
        gradient_bytes=trainable * per_param,
        optimizer_bytes=sum(optimizer.state_bytes(n, per_param) for n in sizes),
        step_temporary_bytes=step_temporary_bytes(optimizer, sizes, per_param, device),
        activation_bytes=activations.activation_bytes(spec, setup, device),
        recompute_bytes=activations.recompute_bytes(spec, setup, device),
        logits_bytes=logits, logits_grad_bytes=logits_grad,
        cuda_context_bytes=CUDA_CONTEXT_BYTES if device == "cuda" else 0,
        adapter_bytes=trainable * ADAPTER_BYTES_PER_PARAM if setup.adapters else None, warnings=tuple(warnings),
    )


def refuse_unplannable(spec: ArchSpec) -> None:
    """Fine-tuning is planned only for uniform dense decoders with attention caches: mixture-of-experts layers,
    layer groups of several kinds (hybrids), MLA and recurrent state are refused rather than planned wrongly."""
    groups = getattr(spec, "groups", ())
    kinds = {cache.kind for _, cache in getattr(spec, "caches", ())}
    reason = ("mixture-of-experts layers" if any(getattr(g, "experts", ()) for g in groups) else
              "layers of several kinds" if len({(g.linears, g.float_params) for g in groups}) > 1 else
              "MLA or recurrent layers" if kinds - {"full_attention", "sliding_attention"} else
              "linears outside its decoder layers" if getattr(spec, "extra_linears", ()) else None)
    if reason:
        raise UsageError(f"{spec.name} has {reason}; falconbench plans fine-tuning only for uniform dense decoder "
                         "transformers (Falcon, Llama, Mistral, MPT, GPT-NeoX and Llama-style). Plan its inference "
                         "instead (--task inference)")


def plan_finetune(models: Iterable[str], setups: Iterable[FinetuneSetup], device: str = "cuda") -> list[FinetuneRow]:
    """Plan every model × setup."""
    from .sources import resolve_model

    specs = [resolve_model(m).spec() for m in models]
    setups = list(setups)
    return [plan_finetune_point(spec, setup, device) for spec in specs for setup in setups]
