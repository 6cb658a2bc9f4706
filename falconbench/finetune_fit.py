"""`falconbench fit --task finetune`: which card each fine-tuning method needs, the longest sequence and the largest
micro-batch per card, and a bound on training tokens/s, from the fine-tuning plan's bytes.

The question per card is the planner's inequality (`planner.fits_on`): the plan's total (weights, trainable
parameters, gradients, optimizer state, saved activations, logits, CUDA context) ≤ memory × (1 − margin).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable, Sequence

from .finetune import FinetuneRow, FinetuneSetup, get_optimizer, plan_finetune_point
from .fit import check_margin, largest_fitting, usable_bytes
from .gpus import GPU, dtype_support, get_gpu, gpu_profiles
from .planner import SAFETY_MARGIN, fits_on
from .sources import resolve_model
from .spec import ArchSpec

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
    tokens_per_second_bound: float
    plan: FinetuneRow
    task: str = "finetune"
    recommended: bool = False

    def as_dict(self) -> dict:
        row = asdict(self)
        row["plan"] = self.plan.as_dict()
        return row


def tokens_per_second_bound(row: FinetuneRow, gpu: GPU) -> float:
    """A memory-bandwidth bound: each step moves the weights WEIGHT_PASSES times and the trainable state through
    the optimizer, for seq_len × batch tokens. Compute (about 6 FLOPs per parameter per token for full
    fine-tuning) is usually the tighter limit; the GPU profiles carry bandwidth, not FLOPs."""
    passes = WEIGHT_PASSES_CHECKPOINTED if row.gradient_checkpointing else WEIGHT_PASSES
    weights = row.frozen_weights_bytes + row.trainable_bytes + row.weight_copy_bytes
    step_bytes = passes * weights + OPTIMIZER_PASSES * (row.trainable_bytes + row.gradient_bytes
                                                        + row.optimizer_bytes)
    return gpu.bandwidth_bytes_per_second * row.seq_len * row.batch / step_bytes


def fit_finetune_row(spec: ArchSpec, setup: FinetuneSetup, gpu: GPU, margin: float) -> FinetuneFitRow:
    plan = plan_finetune_point(spec, setup)
    supported, suggestion = dtype_support(gpu, setup.scheme)

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
        dtype_supported=supported, suggestion=suggestion, tokens_per_second_bound=tokens_per_second_bound(plan, gpu),
        plan=plan,
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
