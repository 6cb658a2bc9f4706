"""`falconbench fit`: which card, which scheme, how much context and batch, from the planner's bytes.

For every GPU × scheme the question is one inequality, the planner's (`planner.fits_on`):

    weights + KV cache(context, batch) + runtime(context, batch) ≤ memory × (1 − margin)

Weights and KV cache are the planner's exact bytes; runtime is its documented estimate (CUDA context plus the
prefill's transient tensors), or measured figures from a `falconbench run` (`calibrate.py`). The largest context
and batch are found by integer search over that same total, so they are exact against it. A model that does not
fit one card is split across several the way accelerate's `device_map="auto"` places it: whole decoder layers
(with their KV cache) per card, the embeddings on the first, the final norm and head on the last.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Sequence

from .calibrate import Calibration, QualityCost, read_calibration
from .errors import UsageError
from .gpus import GPU, dtype_support, get_gpu, gpu_profiles
from .planner import (SAFETY_MARGIN, check_positive, fits_on, idle_expert_bytes, layer_bytes, outer_bytes, plan_point,
                      weights_bytes)
from .schemes import DEFAULT_DTYPES, KV_DTYPE_AUTO, Scheme, compute_bytes, get_scheme, kv_dtype_bytes
from .sources import resolve_model
from .spec import ArchSpec

# Searches stop here: 2^40 tokens or sequences is beyond any card, so reaching it means "unbounded".
SEARCH_LIMIT = 2**40


@dataclass(frozen=True)
class Footprint:
    """One model in one scheme: the planner's bytes, with measured weights and runtime where a run calibrated them."""

    spec: ArchSpec
    scheme: Scheme
    calibration: Calibration | None = None
    kv_dtype: str = KV_DTYPE_AUTO
    attn_impl: str = "sdpa"
    device: str = "cuda"

    def point(self, context: int, batch: int):
        """The planner's row for this footprint at `context` tokens and `batch` sequences."""
        return plan_point(self.spec, self.scheme, context, batch, self.kv_dtype, self.attn_impl, self.device)

    def parts(self, context: int, batch: int) -> tuple[int, int, int]:
        """(weights, KV cache, runtime) bytes at `context` tokens and `batch` sequences."""
        row = self.point(context, batch)
        weights, runtime = row.weights_bytes, row.runtime_bytes
        cal = self.calibration
        if cal is not None:
            weights = cal.weights_bytes
            if cal.overhead_bytes is not None:
                # Measured overhead at the run's own point, plus the planner's growth of the transient tensors
                # from there to the asked point: equal to the measurement where the run measured.
                at_run = self.point(cal.run_context, cal.run_batch).runtime_bytes
                runtime += cal.overhead_bytes - at_run
        return weights, row.kv_cache_bytes, runtime

    def total(self, context: int, batch: int) -> int:
        return sum(self.parts(context, batch))

    @property
    def calibrated(self) -> tuple[str, ...]:
        """Which figures are measured rather than planned."""
        if self.calibration is None:
            return ()
        return ("weights",) + (("runtime",) if self.calibration.overhead_bytes is not None else ())


def largest_fitting(fits: Callable[[int], bool], limit: int = SEARCH_LIMIT) -> int:
    """The largest n in 1..limit with fits(n), 0 when fits(1) is false; `fits` must hold up to a point, then fail."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # invariant: fits(low), not fits(high) (or high beyond the limit)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def usable_bytes(gpu: GPU, margin: float) -> int:
    """The most bytes `fits_on` accepts on this card: whole bytes within memory × (1 − margin)."""
    return int(gpu.memory_bytes * (1 - margin))


def layer_weight_bytes(spec: ArchSpec, scheme: Scheme) -> tuple[int, tuple[tuple[int, int], ...], int]:
    """(embeddings, (layer count, one layer's bytes) per group, final norm + head); they add up to
    `weights_bytes`."""
    first, last = outer_bytes(spec, scheme)
    return first, tuple((g.count, layer_bytes(g, scheme)) for g in spec.groups), last


# A run of identical pieces placed one after another: (bytes of each, how many). The split works on runs, so its
# time and memory do not grow with the layer count (a config may claim 10^12 layers): the layers of a group are
# identical, so how many fill a card is a division, not a loop.
Run = tuple[int, int]
MAX_LISTED_CARDS = 1024  # a split over more cards lists each distinct card load once (FitRow.per_gpu_bytes)


def split_runs(footprint: Footprint, context: int, batch: int) -> list[Run]:
    """Bytes in the order accelerate places modules: embeddings, each group's decoder layers with their cache, the
    head. Measured weights (a calibrated run) are spread over the pieces in proportion to the planned ones."""
    spec, scheme = footprint.spec, footprint.scheme
    first, groups, last = layer_weight_bytes(spec, scheme)
    kv_width, state = kv_dtype_bytes("auto", scheme), compute_bytes(scheme)
    caches = [sum(c.bytes(context, batch, kv_width, state) for c in g.caches) for g in spec.groups]
    pieces = [(first, 1, 0)] + [(layer, count, cache) for (count, layer), cache in zip(groups, caches)] + [
        (last, 1, 0)]
    return [(weight + cache, count) for weight, count, cache in rescale(pieces, footprint.parts(context, batch)[0])]


def expand(runs: Sequence[Run]) -> list[int]:
    """Every piece of `runs`, one by one (for small splits and tests)."""
    return [size for size, count in runs for _ in range(count)]


def rescale(pieces: Sequence[tuple[int, int, int]], total: int) -> list[tuple[int, int, int]]:
    """Runs (weight bytes, count, cache bytes) with their weights scaled to sum to `total` exactly; the rounding
    remainder goes to the first of the largest pieces, which becomes a run of its own."""
    planned = sum(size * count for size, count, _ in pieces)
    if planned == total or planned == 0:
        return list(pieces)
    scaled = [(size * total // planned, count, cache) for size, count, cache in pieces]
    remainder = total - sum(size * count for size, count, _ in scaled)
    index = max(range(len(scaled)), key=lambda i: (scaled[i][0] if scaled[i][1] else -1, -i))
    size, count, cache = scaled[index]
    rest = [(size, count - 1, cache)] if count > 1 else []
    return scaled[:index] + [(size + remainder, 1, cache)] + rest + scaled[index + 1:]


def pack(runs: Sequence[Run], per_card: int, capacity: int) -> list[Run] | None:
    """Fill cards in order, moving to the next when a piece does not fit; the cards' loads as runs (load, cards),
    or None if a piece cannot fit any card. `per_card` is what every card carries besides its pieces (CUDA
    context, transients). The last run always has one card: the one still being filled."""
    if any(count and per_card + size > capacity for size, count in runs):
        return None
    loads: list[Run] = [(per_card, 1)]
    for size, count in runs:
        if not count:
            continue
        load = loads[-1][0]
        here = count if size == 0 else min(count, (capacity - load) // size)  # what still fits the open card
        loads[-1] = (load + here * size, 1)
        count -= here
        if count:
            per_new = (capacity - per_card) // size  # at least 1: checked above
            full, rest = divmod(count, per_new)
            if rest == 0:  # the last full card stays open for the next pieces
                full, rest = full - 1, per_new
            if full:
                loads.append((per_card + per_new * size, full))
            loads.append((per_card + rest * size, 1))
    return loads


def card_count(loads: Sequence[Run]) -> int:
    return sum(count for _, count in loads)


def balanced_split(runs: Sequence[Run], per_card: int, capacity: int) -> list[Run] | None:
    """The fewest cards that hold `runs` in order, and among those splits the one whose fullest card is emptiest.

    In-order greedy filling gives the fewest cards; lowering the capacity by binary search until that count
    would grow spreads the layers evenly, as `device_map="auto"` balances them over the cards it is given.
    """
    greedy = pack(runs, per_card, capacity)
    if greedy is None:
        return None
    cards = card_count(greedy)
    largest = max(size for size, count in runs if count)
    low, high = per_card + largest - 1, capacity  # nothing fits at `low`; `cards` cards do at `high`
    while high - low > 1:
        mid = (low + high) // 2
        loads = pack(runs, per_card, mid)
        low, high = (low, mid) if loads is not None and card_count(loads) <= cards else (mid, high)
    return pack(runs, per_card, high)


def listed_loads(loads: Sequence[Run]) -> tuple[int, ...]:
    """Each card's bytes in order; over MAX_LISTED_CARDS cards, each distinct load once, in order."""
    if card_count(loads) <= MAX_LISTED_CARDS:
        return tuple(expand([run for run in loads if run[1]]))
    return tuple(dict.fromkeys(load for load, count in loads if count))


@dataclass(frozen=True)
class FitRow:
    """One model in one scheme on one card at one context and batch."""

    model: str
    gpu: str
    dtype: str
    context: int
    batch: int
    margin: float
    memory_bytes: int
    usable_bytes: int
    bandwidth_bytes_per_second: float
    weights_bytes: int
    kv_cache_bytes: int
    runtime_bytes: int
    total_bytes: int
    fits: bool
    headroom_bytes: int  # usable − total: negative when it does not fit
    max_context: int  # at this batch, on one card; 0 when nothing fits
    max_batch: int  # at this context, on one card
    position_limit: int | None
    max_context_beyond_positions: bool
    gpus_needed: int | None  # None when one piece (a layer or the embeddings) exceeds the card
    per_gpu_bytes: tuple[int, ...]  # each card's bytes; over MAX_LISTED_CARDS cards, each distinct load once
    bf16_supported: bool
    dtype_supported: bool
    suggestion: str | None
    decode_tokens_per_second_bound: float  # per sequence: bandwidth ÷ bytes read per step (weights + KV)
    calibrated: tuple[str, ...] = ()
    recommended: bool = False
    warnings: tuple[str, ...] = field(default=())
    # What stops the context growing on one card: "kv cache" (and activations) when a layer's cache grows with
    # every token; "prefill activations" when every cache stops (sliding windows, recurrent state): chunked
    # prefill would lift that limit, the cache never sets one.
    context_limited_by: str = "kv cache"

    def __post_init__(self):
        if self.total_bytes != self.weights_bytes + self.kv_cache_bytes + self.runtime_bytes:
            raise ValueError("total_bytes must be weights + KV cache + runtime")

    @property
    def batch_tokens_per_second_bound(self) -> float:
        """All sequences together: each decode step yields `batch` tokens."""
        return self.decode_tokens_per_second_bound * self.batch

    def as_dict(self) -> dict:
        row = asdict(self)
        row["batch_tokens_per_second_bound"] = self.batch_tokens_per_second_bound
        for key in ("per_gpu_bytes", "calibrated", "warnings"):
            row[key] = list(row[key])
        return row


def fit_row(footprint: Footprint, gpu: GPU, context: int, batch: int, margin: float) -> FitRow:
    """Every answer for one card: fit, headroom, limits, split, dtype support and the bandwidth bound."""
    spec, scheme = footprint.spec, footprint.scheme
    weights, kv, runtime = footprint.parts(context, batch)
    total = weights + kv + runtime
    fits = fits_on(total, gpu, margin)
    max_context = largest_fitting(lambda c: fits_on(footprint.total(c, batch), gpu, margin))
    max_batch = largest_fitting(lambda b: fits_on(footprint.total(context, b), gpu, margin))
    split = [(total, 1)] if fits else balanced_split(split_runs(footprint, context, batch), runtime,
                                                     usable_bytes(gpu, margin))
    supported, suggestion = dtype_support(gpu, scheme)
    limit = spec.max_positions
    return FitRow(
        model=spec.name, gpu=gpu.name, dtype=scheme.name, context=context, batch=batch, margin=margin,
        memory_bytes=gpu.memory_bytes, usable_bytes=usable_bytes(gpu, margin),
        bandwidth_bytes_per_second=gpu.bandwidth_bytes_per_second, weights_bytes=weights, kv_cache_bytes=kv,
        runtime_bytes=runtime, total_bytes=total, fits=fits, headroom_bytes=usable_bytes(gpu, margin) - total,
        max_context=max_context, max_batch=max_batch, position_limit=limit,
        max_context_beyond_positions=bool(limit and max_context > limit),
        gpus_needed=card_count(split) if split else None, per_gpu_bytes=listed_loads(split or ()),
        bf16_supported=gpu.bf16, dtype_supported=supported, suggestion=suggestion,
        # Each decoded token reads every weight and the whole cache once; a pipeline split reads them card
        # after card, so one card's bandwidth bounds it just the same.
        decode_tokens_per_second_bound=gpu.bandwidth_bytes_per_second / bytes_read_per_step(footprint, weights, kv,
                                                                                           batch),
        calibrated=footprint.calibrated, warnings=footprint.point(context, batch).warnings,
        context_limited_by="kv cache" if spec.cache_grows else "prefill activations",
    )


def bytes_read_per_step(footprint: Footprint, weights: int, kv: int, batch: int) -> int:
    """Each decode step reads the whole cache and every weight once, except the routed experts no sequence of
    the batch is routed to (a mixture of experts reads a fraction of its weights)."""
    planned = weights_bytes(footprint.spec, footprint.scheme)
    idle = idle_expert_bytes(footprint.spec, footprint.scheme, batch) * weights // planned if planned else 0
    return weights - idle + kv


@dataclass(frozen=True)
class Recommendation:
    """The smallest card (by memory, then bandwidth) and scheme that meet one context × batch request."""

    context: int
    batch: int
    row: FitRow | None  # None when no card holds the model even split
    quality: QualityCost | None = None  # from the calibrating run; None without --calibrate


@dataclass(frozen=True)
class FitResult:
    """All rows (context × batch × card × scheme), a recommendation per context × batch, and the calibration used."""

    model: str
    rows: tuple[FitRow, ...]
    recommendations: tuple[Recommendation, ...]
    calibrations: tuple[Calibration, ...] = ()
    calibration_source: str | None = None
    calibration_notes: tuple[str, ...] = ()
    placements: tuple = ()  # (scheme, placement.Placement) under --device-map and --max-memory


def card_order(row: FitRow) -> tuple:
    return (row.memory_bytes, row.bandwidth_bytes_per_second, row.gpu)


def recommend(rows: Sequence[FitRow], scheme_order: Sequence[str]) -> FitRow | None:
    """One card that holds it, smallest first, in the earliest scheme given (the list runs from most to least
    precise by default); failing that, the fewest cards of a split. Cards that lack the dtype come last."""
    usable = [r for r in rows if r.dtype_supported] or list(rows)  # only bf16 on cards without it: say so
    rank = {name: i for i, name in enumerate(scheme_order)}
    single = [r for r in usable if r.fits]
    if single:
        return min(single, key=lambda r: (card_order(r), rank[r.dtype]))
    split = [r for r in usable if r.gpus_needed]
    return min(split, key=lambda r: (r.gpus_needed, card_order(r), rank[r.dtype])) if split else None


def check_margin(margin: float) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise UsageError(f"margin must be a fraction from 0 up to (not including) 1, got {margin!r}. "
                         "Example: --margin 0.05 keeps 5% of each card free")
    return float(margin)


def fit(model: str, dtypes: Iterable[str] = DEFAULT_DTYPES, contexts: Iterable[int] = (2048,),
        batches: Iterable[int] = (1,), gpus: Iterable[str] | None = None, margin: float = SAFETY_MARGIN,
        calibrate: str | None = None, kv_dtype: str = KV_DTYPE_AUTO, attn_impl: str = "sdpa",
        device: str = "cuda", device_map: str | None = None, max_memory: dict[str, int] | None = None) -> FitResult:
    """Fit one model on every card × scheme at each context × batch; `calibrate` is a run folder to measure from;
    under `device_map` and its `max_memory`, where each scheme's layers go."""
    from .placement import check_plan_budgets, plan_placement

    check_plan_budgets(device_map, max_memory, device)
    source = resolve_model(model)
    spec = source.spec()
    schemes = [get_scheme(d) for d in dtypes]
    cards = [get_gpu(g) for g in gpus] if gpus else list(gpu_profiles())
    contexts = [check_positive("context", c) for c in contexts]
    batches = [check_positive("batch", b) for b in batches]
    margin = check_margin(margin)
    calibration = read_calibration(calibrate, spec, [s.name for s in schemes], source.config_sha256) \
        if calibrate else None
    by_dtype = {c.dtype: c for c in calibration.items} if calibration else {}
    footprints = [Footprint(spec, s, by_dtype.get(s.name), kv_dtype, attn_impl, device) for s in schemes]
    for footprint in footprints[:1]:
        footprint.point(contexts[0], batches[0])  # refuses an unknown kv dtype, attention or device up front
    rows, recommendations = [], []
    for context in contexts:
        for batch in batches:
            block = [fit_row(fp, gpu, context, batch, margin) for gpu in cards for fp in footprints]
            best = recommend(block, [s.name for s in schemes])
            block = [replace(r, recommended=True) if r is best else r for r in block]
            quality = by_dtype[best.dtype].quality if best and best.dtype in by_dtype else None
            recommendations.append(Recommendation(context, batch, best and replace(best, recommended=True), quality))
            rows += block
    placements = tuple((s.name, plan_placement(spec, s, device_map, max_memory)) for s in schemes) if device_map else ()
    return FitResult(spec.name, tuple(rows), tuple(recommendations), calibration.items if calibration else (),
                     calibration.source if calibration else None, calibration.notes if calibration else (), placements)
