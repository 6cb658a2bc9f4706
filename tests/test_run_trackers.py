"""Memory trackers (calibrated against known allocations), the CUDA path through fakes, exact tensor bytes."""

import json
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from falconbench.run import footprint  # noqa: E402
from falconbench.run.trackers import CpuTracker, CudaTracker, PeakSampler, make_tracker, timed  # noqa: E402
from falconbench.schemes import get_scheme  # noqa: E402

MIB = 2**20
GIB = 2**30
# A known allocation must show in the peak: all of it, give or take what the interpreter freed since the
# baseline (below) and the allocator's bookkeeping and whatever else it touched meanwhile (above).
CALIBRATION_SIZE = 64 * MIB
CALIBRATION_BELOW = 2 * MIB
CALIBRATION_ABOVE = 16 * MIB


def calibrated(peak: int) -> bool:
    return CALIBRATION_SIZE - CALIBRATION_BELOW <= peak <= CALIBRATION_SIZE + CALIBRATION_ABOVE


def measure_in_a_fresh_process(sizes: list[int], sampled: bool = False) -> dict:
    """Per-phase peaks above the baseline in a new interpreter, as the worker measures: a long-lived test process
    keeps freed blocks in its allocator's arenas, so a new allocation there may not raise the RSS at all.

    `sampled`: as on a system without clear_refs, so the tracker samples RSS on a thread; each tensor is then held
    until the sampler has seen it (10 s at most)."""
    code = f"""
import json, time, torch
from falconbench.run.trackers import CpuTracker, ProcRss

class NoKernelPeak(ProcRss):
    def reset_peak(self):
        return False

tracker = CpuTracker(rss=NoKernelPeak(), interval=0.001) if {sampled!r} else CpuTracker()
tracker.start()
for index, size in enumerate({sizes!r}):
    tracker.begin(str(index))
    block = torch.ones(size // 4, dtype=torch.float32)  # written, so every page is resident
    deadline = time.monotonic() + 10
    while tracker._sampler is not None and tracker._sampler.peak < tracker.baseline + size * 0.9 \\
            and time.monotonic() < deadline:
        time.sleep(0.005)
    del block
    tracker.end(str(index))
print(json.dumps({{"source": tracker.summary()["peak_source"], "peak": tracker.peak_bytes(),
                  "phases": [tracker.phases[str(i)]["rss_peak_bytes"] - tracker.baseline for i in range(len({sizes!r}))]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cpu_peak_shows_a_transient_tensor_of_known_size():
    measured = measure_in_a_fresh_process([CALIBRATION_SIZE])
    assert measured["source"] in ("kernel VmHWM", "sampled RSS")
    assert calibrated(measured["peak"]), measured["peak"] / MIB


def test_cpu_peaks_are_per_phase():
    measured = measure_in_a_fresh_process([CALIBRATION_SIZE, CALIBRATION_SIZE // 8])
    if measured["source"] != "kernel VmHWM":
        pytest.skip("the kernel's peak cannot be reset here; the sampler test covers this platform")
    big, small = measured["phases"]
    assert calibrated(big) and small < CALIBRATION_SIZE // 2


def test_sampled_peak_shows_a_held_tensor_of_known_size():
    measured = measure_in_a_fresh_process([CALIBRATION_SIZE], sampled=True)
    assert measured["source"] == "sampled RSS"
    assert calibrated(measured["peak"]), measured["peak"] / MIB


class FakeCuda:
    """torch.cuda's accounting: a caching allocator keeps freed blocks reserved."""

    def __init__(self):
        self.allocated_bytes = self.reserved_bytes = self.peak_allocated = self.peak_reserved = 0
        self.initialized, self.syncs, self.resets = False, 0, 0

    def init(self):
        self.initialized = True

    def synchronize(self):
        self.syncs += 1

    def reset_peak(self):
        self.resets += 1
        self.peak_allocated, self.peak_reserved = self.allocated_bytes, self.reserved_bytes

    def alloc(self, n):
        self.allocated_bytes += n
        self.reserved_bytes = max(self.reserved_bytes, self.allocated_bytes)
        self.peak_allocated = max(self.peak_allocated, self.allocated_bytes)
        self.peak_reserved = max(self.peak_reserved, self.reserved_bytes)

    def free(self, n):
        self.allocated_bytes -= n

    def max_allocated(self):
        return self.peak_allocated

    def max_reserved(self):
        return self.peak_reserved

    def allocated(self):
        return self.allocated_bytes

    def reserved(self):
        return self.reserved_bytes


class FakeNvml:
    """Device-wide used memory: other processes, plus this process's context once created, plus its pool."""

    def __init__(self, cuda, others, context):
        self.cuda, self.others, self.context = cuda, others, context

    def used_bytes(self):
        return self.others + (self.context if self.cuda.initialized else 0) + self.cuda.reserved_bytes

    def total_bytes(self):
        return 80 * GIB


def test_cuda_tracker_reads_baseline_context_and_per_phase_peaks():
    cuda = FakeCuda()
    nvml = FakeNvml(cuda, others=3 * GIB, context=500 * MIB)
    tracker = CudaTracker(cuda, nvml, interval=0.001)
    tracker.read_baseline()
    cuda.init()  # a library's import created the context before the tracker's start: still counted as ours
    tracker.start()
    assert cuda.initialized and tracker.baseline == 3 * GIB and tracker.context_bytes == 500 * MIB
    tracker.begin("load")
    cuda.alloc(14 * GIB)  # weights
    tracker.end("load")
    tracker.begin("prefill")
    cuda.alloc(2 * GIB)  # activations, freed but kept in the allocator's pool
    cuda.free(2 * GIB)
    tracker.end("prefill")
    tracker.begin("decode")
    cuda.alloc(GIB // 2)  # KV cache
    tracker.end("decode")
    phases = tracker.phases
    assert phases["load"] == {"torch_peak_allocated_bytes": 14 * GIB, "torch_peak_reserved_bytes": 14 * GIB,
                              "nvml_peak_used_bytes": 14 * GIB + 500 * MIB, "growth_bytes": 14 * GIB}
    assert phases["prefill"]["growth_bytes"] == 2 * GIB  # what prefill allocated beyond the weights
    assert phases["prefill"]["torch_peak_allocated_bytes"] == 16 * GIB
    # the peak was reset when decode began: decode's own high-water mark, not prefill's
    assert phases["decode"]["torch_peak_allocated_bytes"] == 14 * GIB + GIB // 2
    assert phases["decode"]["torch_peak_reserved_bytes"] == 16 * GIB
    assert cuda.resets == 3 and cuda.syncs >= 6
    assert tracker.peak_bytes() == 16 * GIB + 500 * MIB  # NVML: pool + context, baseline removed
    assert tracker.peak_bytes(("load",)) == 14 * GIB + 500 * MIB
    tracker.forget(("prefill", "decode"))
    assert set(tracker.phases) == {"load"}
    assert tracker.summary()["peak_source"].startswith("NVML")


def test_cuda_tracker_without_nvml_falls_back_to_torch_reserved():
    cuda = FakeCuda()
    tracker = CudaTracker(cuda, None)
    tracker.start()
    tracker.begin("load")
    cuda.alloc(GIB)
    tracker.end("load")
    assert tracker.baseline is None and tracker.context_bytes is None
    assert tracker.peak_bytes() == GIB and "no NVML" in tracker.summary()["peak_source"]


def test_repeated_phases_keep_the_highest_peak():
    cuda = FakeCuda()
    tracker = CudaTracker(cuda, FakeNvml(cuda, 0, 0))
    tracker.start()
    for size in (3 * GIB, GIB):
        tracker.begin("prefill")
        cuda.alloc(size)
        cuda.free(size)
        tracker.end("prefill")
    assert tracker.phases["prefill"]["torch_peak_allocated_bytes"] == 3 * GIB


def test_sampler_keeps_the_maximum_it_saw():
    values = iter([5, 9, 2] + [1] * 10_000)
    with PeakSampler(lambda: next(values), interval=0.0001) as sampler:
        while sampler.peak < 9:
            time.sleep(0.001)
    assert sampler.peak == 9


def test_timed_synchronizes_around_the_work():
    calls = []
    result, seconds = timed(lambda: (calls.append("work"), time.sleep(0.02))[0], lambda: calls.append("sync"))
    assert calls == ["sync", "work", "sync"] and seconds >= 0.02


def test_make_tracker_for_cpu():
    assert isinstance(make_tracker("cpu"), CpuTracker)


def test_tensor_bytes_counts_each_storage_once():
    base = torch.zeros(100, dtype=torch.float32)
    other = torch.zeros(10, dtype=torch.bfloat16)
    assert footprint.tensor_bytes([base, base[:10], base.view(10, 10), other, None]) == 400 + 20


def test_tied_weights_count_once():
    embedding = torch.nn.Embedding(64, 32)
    head = torch.nn.Linear(32, 64, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleDict({"embed": embedding, "head": head})
    assert footprint.weights_bytes(model) == 64 * 32 * 4


@pytest.mark.parametrize("dtype", ["int8", "nf4", "nf4-dq", "fp4"])
def test_bitsandbytes_state_is_counted_exactly(dtype):
    """One quantized layer measured (weight + SCB, or packed weight + QuantState) equals the scheme's formula."""
    pytest.importorskip("bitsandbytes")
    from falconbench.run.loading import to_bnb

    scheme = get_scheme(dtype)
    linear = torch.nn.Linear(256, 96, bias=False).to(getattr(torch, scheme.torch_dtype))
    layer = to_bnb(linear, scheme, 6.0)
    expected = scheme.linear_weight_bytes(256, 96)
    assert footprint.weights_bytes(layer) == expected
    with torch.inference_mode():
        layer(torch.randn(2, 256, dtype=getattr(torch, scheme.torch_dtype)))
    if dtype == "int8":  # SCB moved from the weight to the layer's state at the first forward, still counted once
        assert layer.state.SCB is not None and footprint.weights_bytes(layer) == expected
