"""A run under a device map: what `from_pretrained` is given, the placement planned beforehand, and the placement
read back from the loaded model.

transformers' `from_pretrained(device_map="auto", max_memory=..., offload_folder=...)` asks its own copy of
accelerate's rules where each module goes (see `falconbench/placement.py`), loads the modules mapped to a GPU or
the CPU, and leaves those mapped to disk on the meta device behind accelerate hooks that read their weights at every
forward. On a CPU-only machine the CPU is the main device: "cpu" modules are ordinary CPU tensors, "disk" modules
are read from the model's own safetensors files (transformers points its offload index at them, so the offload
folder stays empty unless a weight has to be converted and re-saved). With a GPU, "cpu" modules are offloaded too:
kept in CPU memory and copied to the GPU for each forward.

The torch-free parts (plan, checks) run in the parent; `measured_placement` runs in the worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..placement import CPU, Placement, accelerate_key, device_label, plan_placement
from .config import RunConfig

OFFLOAD_FOLDER = "offload"  # inside the run's output folder, unless --offload-folder says otherwise


def planned_placement(config: RunConfig, spec) -> Placement | None:
    """The placement the load will get, when its budgets are known (None without --max-memory: accelerate then
    reads the machine's free memory at load time)."""
    if not config.device_map or not config.max_memory:
        return None
    return plan_placement(spec, config.scheme, config.device_map, dict(config.max_memory))


def check_placement(config: RunConfig, placement: Placement | None) -> None:
    """Refuse before any worker starts what transformers would refuse at load (`placement.load_refusal`)."""
    if placement is None or not placement.refused:
        return
    where = " · ".join(f"{label} {n}" for label, n in placement.layers.items())
    raise UsageError(f"{config.dtype} under --device-map {config.device_map} puts layers on {where}: "
                     f"transformers refuses {placement.refused} (it loads them wholly on the CPU or on GPUs only). "
                     "Give the GPUs more "
                     "--max-memory, or measure a float scheme (bf16, fp16) with offload")


def from_pretrained_kwargs(config: RunConfig) -> dict[str, Any]:
    """device_map (and max_memory, offload_folder) for `from_pretrained`: the named map, or everything on one device."""
    if not config.device_map:
        return {"device_map": {"": 0 if config.device == "cuda" else "cpu"}}
    kwargs: dict[str, Any] = {"device_map": config.device_map, "offload_folder": config.offload_folder}
    if config.max_memory:
        kwargs["max_memory"] = {accelerate_key(label): size for label, size in config.max_memory}
    elif config.device == "cpu":
        # NOTE: without budgets accelerate would list every GPU torch sees too; a CPU run gets transformers' own
        # default for the CPU (90% of the memory available) and nothing else
        kwargs["max_memory"] = {CPU: int(available_cpu_bytes() * 0.9)}
    return kwargs


def with_offload_folder(config: RunConfig, output_dir: Path | None) -> RunConfig:
    """The configuration with its offload folder resolved: --offload-folder, else OUTPUT/offload."""
    from dataclasses import replace

    if not config.device_map or config.offload_folder or output_dir is None:
        return config
    return replace(config, offload_folder=str(Path(output_dir) / OFFLOAD_FOLDER))


def available_cpu_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def remove_if_empty(folder: str | None) -> None:
    """transformers creates the offload folder whenever it is given; an unused one is removed."""
    if folder and Path(folder).is_dir() and not any(Path(folder).iterdir()):
        Path(folder).rmdir()


def measured_placement(model, device_map: str) -> Placement:
    """Where the loaded model's decoder layers, parameters and weight bytes are, per device, from its
    `hf_device_map` (set when accelerate dispatched it over several devices or disk), else from the parameters."""
    hf_map = getattr(model, "hf_device_map", None)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers: dict[str, int] = {}
    params: dict[str, int] = {}
    weights: dict[str, int] = {}
    for name, param in model.named_parameters():  # tied weights once
        label = device_of(name, hf_map, param)
        params[label] = params.get(label, 0) + param.numel()
        weights[label] = weights.get(label, 0) + param.numel() * param.element_size()
    for name, module in model.named_modules():
        if type(module).__name__ in layer_classes:
            first = next(module.named_parameters(), None)
            if first is not None:
                label = device_of(f"{name}.{first[0]}", hf_map, first[1])
                layers[label] = layers.get(label, 0) + 1
    order = sorted(set(params) | set(layers), key=device_order)
    return Placement(device_map, {d: layers.get(d, 0) for d in order}, {d: params.get(d, 0) for d in order},
                     {d: weights.get(d, 0) for d in order})


def device_of(name: str, hf_map: dict | None, tensor) -> str:
    """The device label of parameter `name`: its entry in the device map (the longest module prefix), else the
    tensor's own device."""
    if hf_map:
        owners = [key for key in hf_map if key == "" or name == key or name.startswith(key + ".")]
        if owners:
            return label_of(hf_map[max(owners, key=len)])
    return label_of(tensor.device)


def label_of(device) -> str:
    """0, "cuda:0", torch.device("cuda", 0) → gpu0; "cpu" → cpu; "disk" → disk."""
    text = str(device)
    if text.startswith("cuda"):
        return device_label(int(text.partition(":")[2] or 0))
    return device_label(accelerate_key(text))


def device_order(label: str) -> tuple[int, int]:
    key = accelerate_key(label)
    return (0, key) if isinstance(key, int) else ((1, 0) if key == CPU else (2, 0))
