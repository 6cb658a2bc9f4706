"""`falconbench fit --task finetune`: which card each fine-tuning method needs, the longest sequence and the largest
micro-batch per card, and a bound on training tokens/s, from the fine-tuning plan's bytes and FLOPs.

The question per card is the planner's inequality (`planner.fits_on`): the plan's total (the highest phase peak:
weights, trainable parameters, gradients and optimizer state, with saved activations and logits at the start of
backward or the optimizer step's temporaries during the step, and the CUDA context) ≤ memory × (1 − margin).
The tokens/s bound is the lower of two ceilings: the card's compute peak over a step's FLOPs per token, and its
memory bandwidth over the bytes a step moves per token. Training is usually compute-bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable, Sequence

from .finetune import FinetuneRow, FinetuneSetup, get_optimizer, plan_finetune_point
from .fit import check_margin, largest_fitting, usable_bytes
from .gpus import GPU, dtype_support, get_gpu, gpu_profiles
from .planner import SAFETY_MARGIN, fits_on
from .sources import resolve_model
from .schemes import get_scheme
from .spec import ArchSpec, Linear

# Passes over the weights per training step: forward, and backward (the input gradients read every weight
# again); a checkpointed backward recomputes the forward first.
WEIGHT_PASSES = 2
WEIGHT_PASSES_CHECKPOINTED = 3
# AdamW's update reads each parameter, gradient and both moments and writes parameter and moments back.
OPTIMIZER_PASSES = 2


@dataclass(frozen=True)
class FinetuneFitRow:
    """One fine-tuning setup of one model on one card."""

    model: str
    gpu: str
    method: str
    dtype: str
    seq_len: int
    batch: int
    margin: float
    memory_bytes: int
    usable_bytes: int
    total_bytes: int
    fits: bool
    headroom_bytes: int
    max_seq_len: int  # at this batch; 0 when nothing fits
    max_batch: int  # at this sequence length
    dtype_supported: bool  # the card computes the dtype natively (gpus.dtype_support): bf16 needs Ampere or newer
    suggestion: str | None  # what to use instead where it does not
    tokens_per_second_bound: float  # the lower of the compute and the bandwidth bound
    limited_by: str  # "compute" or "bandwidth": which bound is the lower
    compute_tokens_per_second_bound: float
    bandwidth_tokens_per_second_bound: float
    flops_per_token: int
    plan: FinetuneRow
    task: str = "finetune"
    recommended: bool = False

    def as_dict(self) -> dict:
        row = asdict(self)
        row["plan"] = self.plan.as_dict()
        return row


def bandwidth_tokens_per_second_bound(row: FinetuneRow, gpu: GPU) -> float:
    """A memory-bandwidth bound: each step moves the weights WEIGHT_PASSES times and the trainable state through
    the optimizer, for seq_len × batch tokens."""
    passes = WEIGHT_PASSES_CHECKPOINTED if row.gradient_checkpointing else WEIGHT_PASSES
    weights = row.frozen_weights_bytes + row.trainable_bytes + row.weight_copy_bytes
    step_bytes = passes * weights + OPTIMIZER_PASSES * (row.trainable_bytes + row.gradient_bytes
                                                        + row.optimizer_bytes)
    return gpu.bandwidth_bytes_per_second * row.seq_len * row.batch / step_bytes


def training_flops_per_token(spec: ArchSpec, row: FinetuneRow) -> int:
    """Matmul FLOPs of one training step per token, 2 per multiply-add (Kaplan et al. 2020, "Scaling Laws for Neural
    Language Models", §2.1 and Table 1: C ≈ 6N per token, forward 2N and backward 4N).

    N is the matmul weights on the path: every decoder linear, the head, and the LoRA adapters. Backward computes
    the inputs' gradients through every one of them (2N) and the weights' gradients only for those that train
    (2N for full fine-tuning, 2·N_lora for lora and qlora, whose frozen base needs no weight gradients), so full
    fine-tuning is 6N and LoRA about 4N. Attention's QKᵀ and AV add 2·s·d_attn per layer per token in the forward
    (the causal half: s/2 keys on average) and twice that in backward. Gradient checkpointing runs each layer's
    forward once more in backward (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", §5: 8N instead of 6N with full recomputation); the head is not recomputed. Dequantizing
    4-bit weights, norms and the softmax are left out, so the bound is generous.
    """
    layer_weights = spec.num_layers * sum(lin.in_features * lin.out_features for lin in spec.layer_linears)
    head = spec.lm_head or Linear("lm_head", spec.hidden_size, spec.vocab_size)  # a tied head multiplies too
    adapters = row.trainable_params if row.method != "full" else 0
    path = layer_weights + head.in_features * head.out_features + adapters
    attention = spec.num_layers * row.seq_len * spec.num_heads * spec.head_dim  # multiply-adds per token (causal)
    forward = 2 * path + 2 * attention
    backward = 2 * path + 4 * attention + 2 * (path if row.method == "full" else adapters)
    recompute = 2 * (layer_weights + adapters) + 2 * attention if row.gradient_checkpointing else 0
    return forward + backward + recompute


def compute_tokens_per_second_bound(spec: ArchSpec, row: FinetuneRow, gpu: GPU) -> float:
    """The card's datasheet dense peak for the step's matmul dtype over `training_flops_per_token`: qlora and a
    16-bit lora or full fine-tune compute in bf16/fp16; an fp32 one in fp32 (torch uses no TF32 by default)."""
    width = 2 if row.method == "qlora" else get_scheme(row.dtype).float_bytes
    return gpu.flops_per_second(width) / training_flops_per_token(spec, row)


def fit_finetune_row(spec: ArchSpec, setup: FinetuneSetup, gpu: GPU, margin: float) -> FinetuneFitRow:
    plan = plan_finetune_point(spec, setup)
    supported, suggestion = dtype_support(gpu, setup.scheme)
    compute = compute_tokens_per_second_bound(spec, plan, gpu)
    bandwidth = bandwidth_tokens_per_second_bound(plan, gpu)

    def fits(seq_len: int, batch: int) -> bool:
        return fits_on(plan_finetune_point(spec, replace(setup, seq_len=seq_len, batch=batch)).total_bytes, gpu,
                       margin)

    return FinetuneFitRow(
        model=spec.name, gpu=gpu.name, method=setup.method, dtype=setup.dtype, seq_len=setup.seq_len,
        batch=setup.batch, margin=margin, memory_bytes=gpu.memory_bytes, usable_bytes=usable_bytes(gpu, margin),
        total_bytes=plan.total_bytes, fits=fits_on(plan.total_bytes, gpu, margin),
        headroom_bytes=usable_bytes(gpu, margin) - plan.total_bytes,
        max_seq_len=largest_fitting(lambda s: fits(s, setup.batch)),
        max_batch=largest_fitting(lambda b: fits(setup.seq_len, b)),
        dtype_supported=supported, suggestion=suggestion, tokens_per_second_bound=min(compute, bandwidth),
        limited_by="compute" if compute <= bandwidth else "bandwidth", compute_tokens_per_second_bound=compute,
        bandwidth_tokens_per_second_bound=bandwidth, flops_per_token=training_flops_per_token(spec, plan), plan=plan,
    )


@dataclass(frozen=True)
class FinetuneFitResult:
    model: str
    rows: tuple[FinetuneFitRow, ...]
    recommended: FinetuneFitRow | None  # the smallest card that fits, in the first method given


def fit_finetune(model: str, setups: Iterable[FinetuneSetup], gpus: Iterable[str] | None = None,
                 margin: float = SAFETY_MARGIN) -> FinetuneFitResult:
    """Every setup on every card; the recommendation is the smallest card that holds one, earliest setup first."""
    spec = resolve_model(model).spec()
    setups = list(setups)
    for setup in setups:
        get_optimizer(setup.optimizer)
    cards = [get_gpu(g) for g in gpus] if gpus else list(gpu_profiles())
    margin = check_margin(margin)
    rows = [fit_finetune_row(spec, setup, gpu, margin) for gpu in cards for setup in setups]
    best = recommend(rows, setups)
    rows = [replace(r, recommended=True) if r is best else r for r in rows]
    return FinetuneFitResult(spec.name, tuple(rows), best and replace(best, recommended=True))


def recommend(rows: Sequence[FinetuneFitRow], setups: Sequence[FinetuneSetup]) -> FinetuneFitRow | None:
    order = {(s.method, s.dtype, s.seq_len, s.batch): i for i, s in enumerate(setups)}
    # NOTE: qlora on a card without bf16 computes in fp16 with the same bytes (the source post's T4 did), so it
    # counts as usable; a bf16 base there would have to change dtype, so those rows come last.
    usable = [r for r in rows if r.fits and (r.dtype_supported or r.method == "qlora")]
    fitting = usable or [r for r in rows if r.fits]
    return min(fitting, key=lambda r: (r.memory_bytes, -r.tokens_per_second_bound,
                                       order[(r.method, r.dtype, r.seq_len, r.batch)]), default=None)
