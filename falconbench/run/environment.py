"""The software and hardware a row was measured on: versions, CUDA, driver, GPU or CPU name."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("falconbench", "torch", "transformers", "bitsandbytes", "accelerate", "safetensors")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, platform's answer elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, nvml: Any = None) -> dict[str, Any]:
    """Versions and hardware; `nvml` (a PynvmlDevice) adds the driver and the GPU's NVML name and memory."""
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    env.update({name: package_version(name) for name in PACKAGES})
    env["cuda"] = torch.version.cuda
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        if nvml is not None:
            env["driver"] = nvml.driver_version()
            env["gpu_memory_bytes"] = nvml.total_bytes()
    env["executable"] = sys.executable
    return env
