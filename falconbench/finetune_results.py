"""The report's view of fine-tuning rows (`"task": "finetune"` in results.jsonl): one `FinetuneResult` per row,
in raw units, planned beside measured per component and per phase.

A row is read defensively, as the inference rows are (comparison.py): a value of the wrong type becomes None,
never a wrong figure, so a damaged or older file shows what is there and dashes for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .comparison import _int
from . import finetune
from .finetune import PHASES, phase_peak_bytes
from .results import STATUSES, as_float, as_mapping

# The components the report shows per setup, by the fields of FinetuneRow and of the measured row (finetune.py's).
COMPONENTS: tuple[str, ...] = tuple(c.name for c in finetune.COMPONENTS if c.reported)
COMPONENT_NAMES = {c.name: c.label for c in finetune.COMPONENTS}
PHASE_NAMES = {"forward": "forward", "backward": "backward", "optimizer": "optimizer step"}


@dataclass(frozen=True)
class FinetuneResult:
    """One fine-tuning setup of one run: bytes int, seconds float, None where nothing was measured."""

    run: str
    model: str
    status: str
    method: str
    dtype: str
    seq_len: int | None
    batch: int | None
    error: str | None = None
    device: str = "cpu"
    lora_r: int | None = None
    optimizer: str = ""
    gradient_checkpointing: bool = False
    planned: dict[str, int | None] = field(default_factory=dict)  # component -> bytes (COMPONENTS)
    measured: dict[str, int | None] = field(default_factory=dict)
    planned_peaks: dict[str, int | None] = field(default_factory=dict)  # phase -> bytes (finetune.PHASES)
    measured_peaks: dict[str, int | None] = field(default_factory=dict)
    peak_source: str = ""
    planned_trainable_params: int | None = None
    trainable_params: int | None = None
    planned_adapter_bytes: int | None = None  # tensor bytes; None for full fine-tuning
    adapter_bytes: int | None = None  # the saved file's tensor bytes (file less its header)
    adapter_file_bytes: int | None = None
    adapter_header_bytes: int | None = None
    losses: tuple[float, ...] = ()  # every step's, warmup first
    seconds_per_step: float | None = None
    tokens_per_second: float | None = None
    notes: tuple[str, ...] = ()
    steps: int | None = None
    warmup: int | None = None
    environment: dict[str, Any] = field(default_factory=dict, compare=False)
    falconbench_version: str = ""  # of the falconbench that measured the row ("" in rows older than the field)

    @property
    def versions(self) -> dict[str, Any]:
        """The environment's versions, falconbench's as the row recorded it where the environment has none."""
        return {"falconbench": self.falconbench_version or None, **{k: v for k, v in self.environment.items() if v}}

    @property
    def setup(self) -> str:
        """`lora r16 bf16 128×1 ckpt`: method, LoRA rank, dtype, sequence × micro-batch, checkpointing."""
        method = self.method + (f" r{self.lora_r}" if self.lora_r else "")
        shape = f"{self.seq_len if self.seq_len is not None else '-'}×{self.batch or '-'}"
        return f"{method} {self.dtype} {shape}" + (" ckpt" if self.gradient_checkpointing else "")

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def finetune_result(run: str, data: Mapping[str, Any]) -> FinetuneResult:
    """A row of results.jsonl as the report shows it; ValueError when it names no model or a status it lacks."""
    if not isinstance(data.get("model"), str) or data.get("status") not in STATUSES:
        raise ValueError("a fine-tuning row needs a model name and a status "
                         f"({', '.join(STATUSES)})")
    planned, measured = as_mapping(data.get("planned")), as_mapping(data.get("measured"))
    settings = as_mapping(data.get("settings"))
    plan_components = {c.name: _int(planned.get(c.name)) for c in finetune.COMPONENTS}
    peaks, source = measured_phase_peaks(as_mapping(measured.get("memory")))
    context = plan_components["cuda_context_bytes"] or 0
    planned_peaks = planned_phase_peaks(planned, plan_components)
    if source.startswith("torch"):  # torch's counters leave the CUDA context out: so does the plan beside them
        planned_peaks = {phase: value - context for phase, value in planned_peaks.items()}
    losses, notes = measured.get("losses"), measured.get("notes")
    return FinetuneResult(
        run=run, model=data["model"], status=data["status"], method=str(planned.get("method") or "-"),
        dtype=str(data.get("dtype") or planned.get("dtype") or "-"), seq_len=_int(planned.get("seq_len")),
        batch=_int(planned.get("batch")), error=data.get("error") if isinstance(data.get("error"), str) else None,
        device=str(data.get("device") or "cpu"), lora_r=_int(planned.get("lora_r")),
        optimizer=str(planned.get("optimizer") or ""),
        gradient_checkpointing=planned.get("gradient_checkpointing") is True,
        planned={name: plan_components[name] for name in COMPONENTS},
        measured={name: _int(measured.get(name)) for name in COMPONENTS}, planned_peaks=planned_peaks,
        measured_peaks=peaks, peak_source=source, planned_trainable_params=_int(planned.get("trainable_params")),
        trainable_params=_int(measured.get("trainable_params")),
        planned_adapter_bytes=_int(planned.get("adapter_bytes")), adapter_bytes=_int(measured.get("adapter_bytes")),
        adapter_file_bytes=_int(measured.get("adapter_file_bytes")),
        adapter_header_bytes=_int(measured.get("adapter_header_bytes")),
        losses=tuple(x for x in map(as_float, losses) if x is not None) if isinstance(losses, list) else (),
        seconds_per_step=as_float(measured.get("seconds_per_step")),
        tokens_per_second=as_float(measured.get("tokens_per_second")),
        notes=tuple(n for n in notes if isinstance(n, str)) if isinstance(notes, list) else (),
        steps=_int(settings.get("steps")), warmup=_int(settings.get("warmup")),
        environment=as_mapping(measured.get("environment")),
        falconbench_version=data["falconbench_version"] if isinstance(data.get("falconbench_version"), str) else "",
    )


def planned_phase_peaks(planned: Mapping[str, Any], components: Mapping[str, int | None]) -> dict[str, int]:
    """The plan's phase peaks as the row recorded them; a row from before they were recorded, from its components
    (a component that plan did not know, e.g. step_temporary_bytes, counts as what it counted: nothing)."""
    recorded = as_mapping(planned.get("phase_peak_bytes"))
    if all(isinstance(recorded.get(p), int) for p in PHASES):
        return {p: recorded[p] for p in PHASES}
    components = dict(components)
    if "step_temporary_bytes" not in planned:
        components["step_temporary_bytes"] = 0
    return phase_peak_bytes(components) if None not in components.values() else {}


def measured_phase_peaks(memory: Mapping[str, Any]) -> tuple[dict[str, int | None], str]:
    """Each phase's measured peak and what it is: CPU, the process's peak RSS above its baseline (taken after the
    imports, before the model loads); CUDA, NVML's device use above the baseline where the worker had NVML, else
    torch's peak allocated."""
    phases = as_mapping(memory.get("phases"))
    baseline = _int(memory.get("rss_baseline_bytes"))
    keys = (("rss_peak_bytes", "peak RSS above the baseline"), ("nvml_peak_used_bytes", "NVML device use above "
            "the baseline"), ("torch_peak_allocated_bytes", "torch's peak allocated"))
    for key, source in keys:
        values = {phase: _int(as_mapping(phases.get(phase)).get(key)) for phase in PHASES}
        if any(v is not None for v in values.values()):
            if key == "rss_peak_bytes":
                values = {p: v - (baseline or 0) if v is not None else None for p, v in values.items()}
            return values, source
    return dict.fromkeys(PHASES), ""
