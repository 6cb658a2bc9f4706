"""GPU profiles: memory as the card reports it, bandwidth, compute peaks and bf16 support."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from .errors import UsageError, did_you_mean
from .sources import profiles_dir

if TYPE_CHECKING:
    from .schemes import Scheme

MIB = 2**20


@dataclass(frozen=True)
class GPU:
    """One card."""

    name: str
    memory_bytes: int  # total memory as NVML reports it
    bandwidth_bytes_per_second: float  # datasheet peak
    bf16: bool
    arch: str = ""
    flops_16bit_per_second: float = 0.0  # datasheet dense tensor peak: bf16, or fp16 where the card lacks bf16
    flops_fp32_per_second: float = 0.0  # datasheet non-tensor FP32 peak

    def __post_init__(self):
        if self.memory_bytes <= 0 or self.bandwidth_bytes_per_second <= 0:
            raise ValueError(f"GPU {self.name}: memory and bandwidth must be positive")
        if self.flops_16bit_per_second < 0 or self.flops_fp32_per_second < 0:
            raise ValueError(f"GPU {self.name}: compute peaks must not be negative")

    def flops_per_second(self, float_bytes: int) -> float:
        """The compute peak for matmuls whose operands are `float_bytes` wide (2: bf16/fp16, 4: fp32)."""
        return self.flops_fp32_per_second if float_bytes == 4 else self.flops_16bit_per_second


@lru_cache(maxsize=1)
def gpu_profiles() -> tuple[GPU, ...]:
    """All bundled GPUs, smallest memory first."""
    data = json.loads((profiles_dir() / "gpus.json").read_text())
    gpus = (GPU(g["name"], g["memory_mib"] * MIB, g["bandwidth_gbps"] * 1e9, g["bf16"], g.get("arch", ""),
                g["tflops_16bit"] * 1e12, g["tflops_fp32"] * 1e12) for g in data["gpus"])
    return tuple(sorted(gpus, key=lambda g: (g.memory_bytes, g.name)))


def get_gpu(name: str) -> GPU:
    """The GPU called `name`, case-insensitively."""
    wanted = name.strip().lower()
    for gpu in gpu_profiles():
        if gpu.name.lower() == wanted:
            return gpu
    names = [g.name for g in gpu_profiles()]
    raise UsageError(f"unknown GPU {name!r}.{did_you_mean(name, names)} Choose from: {', '.join(names)}")


def dtype_support(gpu: GPU, scheme: "Scheme") -> tuple[bool, str | None]:
    """Whether the card computes the scheme's dtype natively, and what to use instead when it does not.

    bf16 arithmetic needs Ampere or newer (T4 and V100 lack it). nf4 and fp4 compute in bf16 here, so on such a
    card they need `bnb_4bit_compute_dtype=torch.float16`; LLM.int8 computes in fp16 and runs everywhere.
    """
    if scheme.torch_dtype != "bfloat16" or gpu.bf16:
        return True, None
    if scheme.kind == "float":
        return False, "fp16"
    return False, f"{scheme.name} with bnb_4bit_compute_dtype=torch.float16"


def runs_dtype(gpu: GPU, dtype: str) -> bool:
    """Whether the card runs the scheme `dtype` as falconbench configures it (`dtype_support`)."""
    from .schemes import get_scheme

    return dtype_support(gpu, get_scheme(dtype))[0]
