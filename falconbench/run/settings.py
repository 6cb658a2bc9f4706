"""What `falconbench run` is asked to measure: one typed settings object, and the matrix of points it expands to.

The CLI builds a `RunSettings`; `run_benchmark` takes it. The matrix is the cross product of schemes × attention
kernels × prompt lengths × new-token counts × batch sizes; every point is one `RunConfig` (one row, one hash), and
the points that share a load (everything but the shape) run in one process, smallest first.

Pure Python (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UsageError
from ..placement import check_device_map
from ..planner import ATTN_IMPLS
from ..schemes import DEFAULT_DTYPES, get_scheme
from .config import RUN_DEVICES, RunConfig

SHAPE_FIELDS = ("prompt_tokens", "new_tokens", "batch")  # what varies inside one load
DEFAULT_ATTNS = ("sdpa",)


def _distinct(name: str, values: Sequence) -> tuple:
    items = tuple(values)
    if not items:
        raise UsageError(f"--{name.replace('_', '-')} needs at least one value")
    if len(set(items)) != len(items):
        raise UsageError(f"--{name.replace('_', '-')} lists a value twice ({', '.join(map(str, items))}); each "
                         "runs once")
    return items


@dataclass(frozen=True)
class RunSettings:
    """Everything one `run` measures: the model, the matrix's axes, and every knob shared by its points."""

    model: str
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    attns: tuple[str, ...] = DEFAULT_ATTNS
    prompt_tokens: tuple[int, ...] = (RunConfig.prompt_tokens,)
    new_tokens: tuple[int, ...] = (RunConfig.new_tokens,)
    batches: tuple[int, ...] = (RunConfig.batch,)
    device: str = "auto"
    output: Path | None = None
    resume: bool = False
    quality: bool = True
    random_weights: bool = False
    repeats: int = RunConfig.repeats
    warmup: int = RunConfig.warmup
    int8_threshold: float = RunConfig.int8_threshold
    seed: int = RunConfig.seed
    reference: str | None = None  # None: fp32 on CPU (exact enough to be a reference), else bf16
    eval_text: str | None = None
    eval_tokens: int = RunConfig.eval_tokens
    window: int = RunConfig.window
    stride: int = RunConfig.stride
    trust_remote_code: bool = False
    allow_pickle: bool = False
    allow_downloads: bool = False
    memory_cap_bytes: int | None = None
    device_map: str | None = None  # auto | balanced | sequential; None: everything on `device`
    max_memory: tuple[tuple[str, int], ...] = ()  # (("0", bytes), ("cpu", bytes)): the map's budgets
    offload_folder: str | None = None  # None: OUTPUT/offload

    def __post_init__(self):
        budgets = self.max_memory.items() if isinstance(self.max_memory, dict) else self.max_memory
        object.__setattr__(self, "max_memory", tuple((str(device), size) for device, size in budgets))
        # NOTE: canonical scheme names, so BF16 and bf16 are one configuration
        object.__setattr__(self, "dtypes", _distinct("dtype", [get_scheme(d).name for d in self.dtypes]))
        object.__setattr__(self, "attns", _distinct("attn", [a.strip().lower() for a in self.attns]))
        for attn in self.attns:
            if attn not in ATTN_IMPLS:
                raise UsageError(f"unknown attention kernel {attn!r}. Choose from: {', '.join(ATTN_IMPLS)}")
        for name in ("prompt_tokens", "new_tokens", "batches"):
            object.__setattr__(self, name, _distinct(name, getattr(self, name)))
        if self.device not in RUN_DEVICES:
            raise UsageError(f"unknown device {self.device!r}. Choose from: {', '.join(RUN_DEVICES)}")
        if self.reference is not None:
            object.__setattr__(self, "reference", get_scheme(self.reference).name)
        check_device_map(self.device_map, dict(self.max_memory), "cpu" if self.device == "cpu" else "cuda")

    def configs(self, model: str, device: str, quality: bool, reference: str) -> list[RunConfig]:
        """Every point of the matrix, the reference's load first when quality is measured. Quality is a property
        of the scheme's weights, so it is scored once per scheme, in its first attention kernel's load (the
        reference's log-probabilities too: one file, computed once)."""
        dtypes = list(self.dtypes)
        if quality:
            dtypes = [reference] + [d for d in dtypes if d != reference]
        shared = {f.name: getattr(self, f.name) for f in fields(RunConfig) if hasattr(self, f.name)
                  and f.name not in SHAPE_FIELDS + ("model", "dtype", "device", "quality", "reference")}
        return [RunConfig(model=model, dtype=dtype, device=device, attn_impl=attn, prompt_tokens=prompt,
                          new_tokens=new, batch=batch, quality=quality and attn == self.attns[0],
                          reference=reference, **shared)
                for dtype in dtypes for attn in self.attns
                for prompt in self.prompt_tokens for new in self.new_tokens for batch in self.batches]


def load_key(config: RunConfig) -> RunConfig:
    """What one process loads: the configuration with its shape set aside (points of one load share it)."""
    return replace(config, prompt_tokens=RunConfig.prompt_tokens, new_tokens=RunConfig.new_tokens,
                   batch=RunConfig.batch)


def group_loads(configs: Sequence[RunConfig], size: Callable[[RunConfig], int]) -> list[list[int]]:
    """Indices of `configs` grouped by load, in first-seen order; inside a load, smallest first by `size` (the
    planned total), then by shape."""
    groups: dict[RunConfig, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(load_key(config), []).append(index)
    return [sorted(indices, key=lambda i: (size(configs[i]), shape(configs[i]))) for indices in groups.values()]


def shape(config: RunConfig) -> tuple[int, int, int]:
    return config.batch, config.prompt_tokens, config.new_tokens


def dominates(larger: RunConfig, smaller: RunConfig) -> bool:
    """Whether `larger` needs at least everything `smaller` needed: as long a prompt, as many new tokens, as large
    a batch (so when `smaller` ran out of memory, `larger` cannot fit either)."""
    return all(getattr(larger, name) >= getattr(smaller, name) for name in SHAPE_FIELDS)


def describe_shape(config: RunConfig) -> str:
    return f"prompt {config.prompt_tokens} + {config.new_tokens} new × batch {config.batch}"


def skip_reason(point: RunConfig, out_of_memory: Sequence[RunConfig]) -> str | None:
    """Why `point` is not run: a point of its load that it dominates ran out of memory (None: run it)."""
    bound = next((f for f in out_of_memory if dominates(point, f)), None)
    if bound is None:
        return None
    return f"not run: it needs at least what {describe_shape(bound)} needed, which ran out of memory"
