"""Memory trackers per phase (load, prefill, decode), with the device APIs behind small interfaces.

CUDA: torch's peak allocated/reserved bytes (peaks reset at each phase start), NVML's device-used bytes minus
the pre-run baseline (it works inside containers, where per-process NVML reads zero), and the CUDA context's
own cost. CPU: resident set size, baseline and per-phase peak (the kernel's high-water mark, reset through
/proc/self/clear_refs, or a sampling thread where that is unavailable). Tests replace `CudaApi` and `Nvml` with
fakes; the real ones import torch and pynvml lazily.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Iterable, Protocol


class CudaApi(Protocol):
    def init(self) -> None: ...
    def synchronize(self) -> None: ...
    def reset_peak(self) -> None: ...
    def max_allocated(self) -> int: ...
    def max_reserved(self) -> int: ...
    def allocated(self) -> int: ...
    def reserved(self) -> int: ...


class Nvml(Protocol):
    def used_bytes(self) -> int: ...
    def total_bytes(self) -> int: ...


class RssSource(Protocol):
    def rss(self) -> int: ...
    def reset_peak(self) -> bool: ...  # True when the OS tracks the peak from now on
    def peak(self) -> int | None: ...


class TorchCuda:
    """torch.cuda on device 0 (the first visible one)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda

    def init(self) -> None:
        import torch

        self.cuda.init()
        torch.empty(1, device="cuda")  # a first allocation, so the context and the allocator exist

    def synchronize(self) -> None:
        self.cuda.synchronize()

    def reset_peak(self) -> None:
        self.cuda.reset_peak_memory_stats()

    def max_allocated(self) -> int:
        return int(self.cuda.max_memory_allocated())

    def max_reserved(self) -> int:
        return int(self.cuda.max_memory_reserved())

    def allocated(self) -> int:
        return int(self.cuda.memory_allocated())

    def reserved(self) -> int:
        return int(self.cuda.memory_reserved())


class PynvmlDevice:
    """NVML's view of the first visible GPU (CUDA_VISIBLE_DEVICES' first entry: an index or a UUID)."""

    def __init__(self):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        if first.isdigit():
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(first))
        else:
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(first)

    def used_bytes(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def total_bytes(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).total)

    def name(self) -> str:
        name = self.nvml.nvmlDeviceGetName(self.handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def driver_version(self) -> str:
        version = self.nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)


class ProcRss:
    """This process's RSS from /proc/self/status; the peak is the kernel's VmHWM, reset by clear_refs (Linux ≥ 4.0).

    Falls back to psutil (no peak) off Linux or where clear_refs is not writable.
    """

    STATUS, CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"

    def _status_kib(self, field: str) -> int | None:
        try:
            with open(self.STATUS, encoding="ascii") as status:
                for line in status:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def rss(self) -> int:
        value = self._status_kib("VmRSS")
        if value is None:
            import psutil

            value = psutil.Process().memory_info().rss
        return value

    def reset_peak(self) -> bool:
        try:
            with open(self.CLEAR_REFS, "w", encoding="ascii") as handle:
                handle.write("5")  # "5": reset the peak RSS (Documentation/filesystems/proc.rst)
            return True
        except OSError:
            return False

    def peak(self) -> int | None:
        return self._status_kib("VmHWM")


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc's malloc_trim), so a phase's RSS growth counts its
    own allocations rather than reusing what an earlier phase freed; nothing where glibc is not the allocator.

    NOTE: glibc keeps freed blocks below its mmap threshold (which rises to 32 MiB as large blocks are freed) in
    its arenas; without this, prefill after the quality phase allocates tens of MiB and RSS does not move.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakSampler:
    """Reads `read()` every `interval` seconds on a thread and keeps the maximum (for NVML, or RSS off Linux)."""

    def __init__(self, read: Callable[[], int], interval: float = 0.005):
        self.read, self.interval = read, interval
        self.peak = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


class CpuTracker:
    """RSS baseline and per-phase peak of this process."""

    device = "cpu"

    def __init__(self, rss: RssSource | None = None, interval: float = 0.005,
                 release: Callable[[], None] | None = None):
        self.rss_source = rss or ProcRss()
        self.interval = interval
        self.release = release or (release_free_memory if rss is None else (lambda: None))
        self.baseline = 0
        self.phases: dict[str, dict[str, int]] = {}
        self._sampler: PeakSampler | None = None
        self._kernel_peak = False
        self._start = 0

    def read_baseline(self) -> None:
        """Nothing yet: the RSS baseline is taken by `start`, after the imports, so library code does not count."""

    def start(self) -> None:
        self.baseline = self.rss_source.rss()

    def synchronize(self) -> None:
        """Nothing to wait for: CPU work is done when the call returns."""

    def begin(self, phase: str) -> None:
        self.release()
        self._start = self.rss_source.rss()
        self._kernel_peak = self.rss_source.reset_peak()
        if not self._kernel_peak:
            self._sampler = PeakSampler(self.rss_source.rss, self.interval).__enter__()

    def end(self, phase: str) -> None:
        if self._sampler is not None:
            self._sampler.__exit__(None, None, None)
        sampled = self._sampler.peak if self._sampler else 0
        kernel = (self.rss_source.peak() or 0) if self._kernel_peak else 0
        self._sampler = None
        peak = max(sampled, kernel, self.rss_source.rss())
        previous = self.phases.get(phase, {})
        # growth: what this phase added on top of what was resident when it began (the largest of its repeats)
        self.phases[phase] = {"rss_peak_bytes": max(peak, previous.get("rss_peak_bytes", 0)),
                              "rss_end_bytes": self.rss_source.rss(),
                              "growth_bytes": max(peak - self._start, previous.get("growth_bytes", 0))}

    def peak_bytes(self, phases: Iterable[str] | None = None) -> int | None:
        """Peak RSS over all phases (or those named), minus the baseline."""
        peaks = [p["rss_peak_bytes"] for name, p in self.phases.items() if phases is None or name in phases]
        return max(peaks) - self.baseline if peaks else None

    def forget(self, phases: Iterable[str]) -> None:
        """Drop the figures of `phases`, so the next shape point's are its own."""
        for name in phases:
            self.phases.pop(name, None)

    def summary(self) -> dict[str, Any]:
        return {"rss_baseline_bytes": self.baseline, "peak_source": "kernel VmHWM" if self._kernel_peak
                else "sampled RSS", "phases": self.phases}


class CudaTracker:
    """torch peaks per phase, NVML device-used peak against the pre-run baseline, the CUDA context's cost."""

    device = "cuda"

    def __init__(self, cuda: CudaApi, nvml: Nvml | None, interval: float = 0.005):
        self.cuda, self.nvml, self.interval = cuda, nvml, interval
        self.baseline: int | None = None  # NVML used before this process created its context
        self.context_bytes: int | None = None
        self.phases: dict[str, dict[str, int]] = {}
        self._sampler: PeakSampler | None = None
        self._start = 0

    def read_baseline(self) -> None:
        """The device's used bytes before this process touches CUDA (libraries may initialize it on import)."""
        self.baseline = self.nvml.used_bytes() if self.nvml else None

    def start(self) -> None:
        """Create the CUDA context and measure what it cost over the baseline."""
        if self.baseline is None and self.nvml:
            self.read_baseline()
        self.cuda.init()
        self.cuda.synchronize()
        if self.nvml:
            self.context_bytes = self.nvml.used_bytes() - self.baseline - self.cuda.reserved()

    def synchronize(self) -> None:
        self.cuda.synchronize()

    def begin(self, phase: str) -> None:
        self.cuda.synchronize()
        self.cuda.reset_peak()
        self._start = self.cuda.allocated()
        if self.nvml:
            self._sampler = PeakSampler(self.nvml.used_bytes, self.interval).__enter__()

    def end(self, phase: str) -> None:
        self.cuda.synchronize()
        row = {"torch_peak_allocated_bytes": self.cuda.max_allocated(),
               "torch_peak_reserved_bytes": self.cuda.max_reserved()}
        # growth: the tensors this phase allocated on top of those alive when it began (torch's own count)
        row["growth_bytes"] = row["torch_peak_allocated_bytes"] - self._start
        if self._sampler is not None:
            self._sampler.__exit__(None, None, None)
            row["nvml_peak_used_bytes"] = self._sampler.peak - self.baseline
            self._sampler = None
        previous = self.phases.get(phase, {})
        self.phases[phase] = {k: max(v, previous.get(k, v)) for k, v in row.items()}

    def peak_bytes(self, phases: Iterable[str] | None = None) -> int | None:
        """NVML's peak device use minus the baseline (over all phases, or those named); without NVML, torch's
        peak reserved plus nothing else."""
        key = "nvml_peak_used_bytes" if self.nvml else "torch_peak_reserved_bytes"
        peaks = [p[key] for name, p in self.phases.items() if key in p and (phases is None or name in phases)]
        return max(peaks) if peaks else None

    def forget(self, phases: Iterable[str]) -> None:
        """Drop the figures of `phases`, so the next shape point's are its own."""
        for name in phases:
            self.phases.pop(name, None)

    def summary(self) -> dict[str, Any]:
        return {"nvml_baseline_bytes": self.baseline, "cuda_context_bytes": self.context_bytes,
                "peak_source": "NVML device used - baseline" if self.nvml else "torch peak reserved (no NVML)",
                "phases": self.phases}


def make_tracker(device: str) -> CpuTracker | CudaTracker:
    """The real tracker for `device`; NVML is optional (a missing library leaves torch's figures only)."""
    if device == "cpu":
        return CpuTracker()
    try:
        nvml: Nvml | None = PynvmlDevice()
    except Exception:  # noqa: BLE001 - no NVML library or no permission: measure through torch alone
        nvml = None
    return CudaTracker(TorchCuda(), nvml)


def timed(work: Callable[[], Any], synchronize: Callable[[], None]) -> tuple[Any, float]:
    """Run `work` between two synchronizations; return its result and the seconds it took."""
    synchronize()
    start = time.perf_counter()
    result = work()
    synchronize()
    return result, time.perf_counter() - start
