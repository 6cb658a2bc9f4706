"""Where a device map puts a model's layers: the split transformers 5 computes for `from_pretrained(device_map=...,
max_memory=...)`, worked out from the planner's bytes, without torch.

transformers 5 does not call accelerate's `infer_auto_device_map`: it carries its own copy
(`transformers/integrations/accelerate.py`: `_get_device_map`, `get_balanced_memory`, `infer_auto_device_map`),
and that copy is what decides a `run`'s placement (tests/test_placement.py checks this module against it, and
against accelerate's own where the two agree: a sequential split; their balanced buffers differ). The rules, as that
code applies them to a causal LM:

- Modules are visited in the model's order: the base model (each embedding module on its own, decoder layers,
  final norm; OPT registers its final norm before its layers), then the head.
  A module that fits the current device goes there whole; one that does not is split into its children, except a
  decoder layer (`_no_split_modules`), which moves to the next device. Devices: the GPUs named, then cpu, then
  disk (which takes everything left).
- The first GPU (or the CPU when there is none) keeps room for the largest module still to place, so a layer
  offloaded later can be brought back to run.
- A tied output head goes with the embeddings, on their device.
- `balanced` (and `auto`, which transformers treats as balanced) caps every GPU but the last at
  total / GPUs + 1.25 × the largest layer or embedding; `sequential` fills each device in turn.
- Quantized schemes are sized with bitsandbytes' element width (0.5 byte for 4-bit, 1 for int8) for the linears
  transformers replaces, and every budget is scaled by 0.9 (`adjust_max_memory`).

Only weights are placed: the KV cache and activations are not part of the split (they live on the devices the
layers run on).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from .errors import UsageError
from .planner import layer_bytes, layer_quantized_linears, linear_bytes
from .schemes import FP32, Scheme
from .spec import ArchSpec

DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "sequential")
# NOTE: transformers' `_get_device_map`: every string but "sequential" goes through `get_balanced_memory`
BALANCED_MAPS = ("auto", "balanced")
QUANTIZED_ELEMENT_BYTES = {"4bit": 0.5, "int8": 1}  # the bnb quantizers' `quantized_element_size`
QUANTIZED_MEMORY_SHARE = 0.9  # the bnb quantizers' `adjust_max_memory`: room for quantization's buffers
BALANCE_BUFFER = 1.25  # get_balanced_memory: per-GPU share + 1.25 × the largest no-split module or leaf
# NOTE: transformers 5 swaps `type(module) is nn.Linear` only, so Falcon's FalconLinear layers are sized (and
# loaded) at 16 bits by transformers; falconbench quantizes them after the load (FACTS.md, the Falcon trap)
SUBCLASSED_LINEAR_TYPES = ("falcon",)
# NOTE: OPTDecoder registers its final LayerNorm before its layers, so the placement visits it before them
FINAL_NORM_FIRST_TYPES = ("opt",)
CPU, DISK = "cpu", "disk"


def device_label(key: int | str) -> str:
    """accelerate's device key as falconbench names it: 0 → gpu0, cpu, disk."""
    return f"gpu{key}" if isinstance(key, int) else str(key)


def accelerate_key(label: int | str) -> int | str:
    """The inverse of `device_label`: gpu0, "0" or 0 → 0, cpu → cpu."""
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    text = str(label).strip().lower().removeprefix("gpu").removeprefix("cuda:")
    return int(text) if text.isascii() and text.isdigit() else label.strip().lower()


def check_device_map(device_map: str | None, max_memory: Mapping[str, int] | None, device: str) -> None:
    """Refuse a device map falconbench cannot run, or budgets naming devices the run does not have."""
    if device_map is None:
        if max_memory:
            raise UsageError("--max-memory is the budget of a device map. Add --device-map auto (or balanced, "
                             "sequential), or leave --max-memory out")
        return
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"unknown device map {device_map!r}. Choose from: {', '.join(DEVICE_MAPS)}")
    for label, size in (max_memory or {}).items():
        key = accelerate_key(label)
        if key != CPU and not isinstance(key, int):
            raise UsageError(f"--max-memory names device {label!r}: use a GPU index (0, 1, ...) or cpu. Example: "
                             "--max-memory 0=20GiB,cpu=60GiB")
        if isinstance(key, int) and device == "cpu":
            raise UsageError(f"--max-memory names GPU {key} but the device is cpu. Give only cpu=SIZE, or run "
                             "with --device cuda")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UsageError(f"--max-memory {label}: a size must be a byte count, 0 or more, got {size!r}")


def check_plan_budgets(device_map: str | None, max_memory: Mapping[str, int] | None, device: str) -> None:
    """plan and fit place layers only under budgets they are given: they never look at this machine's memory."""
    check_device_map(device_map, max_memory, device)
    if device_map and not max_memory:
        raise UsageError(f"--device-map {device_map} needs --max-memory to place the layers: plan and fit do not "
                         "read this machine's memory. Example: --max-memory 0=20GiB,cpu=60GiB")


@dataclass(frozen=True)
class Placement:
    """Where a device map put (or will put) the decoder layers, parameters and weight bytes, per device."""

    device_map: str
    layers: dict[str, int]  # device label (gpu0, cpu, disk) → decoder layers, devices in accelerate's order
    params: dict[str, int] = field(default_factory=dict)
    weights_bytes: dict[str, int] = field(default_factory=dict)
    refused: str | None = None  # planned: why transformers will refuse to load this split (`load_refusal`)

    def as_dict(self) -> dict:
        return {"device_map": self.device_map, "layers": dict(self.layers), "params": dict(self.params),
                "weights_bytes": dict(self.weights_bytes)}


@dataclass
class _Module:
    """One module of the model as the placement sees it: its size by transformers' rule, its real bytes."""

    name: str
    size: float
    children: list["_Module"] = field(default_factory=list)
    no_split: bool = False
    tied: str | None = None  # the module whose weights this one shares (a tied head ↔ the embeddings)
    layer: bool = False
    params: int = 0
    weights_bytes: int = 0

    def walk(self) -> Iterable["_Module"]:
        yield self
        for child in self.children:
            yield from child.walk()


def _parent(name: str, children: list[_Module]) -> _Module:
    return _Module(name, sum(c.size for c in children), children, params=sum(c.params for c in children),
                   weights_bytes=sum(c.weights_bytes for c in children))


def placement_layer_size(group, scheme: Scheme, transformers_quantizes: bool) -> float:
    """One layer's size as transformers sizes it for placement: bitsandbytes' element width for the linears it
    replaced, the float width for the rest (biases, norms, routers, fused experts), float32 kept where kept."""
    width = QUANTIZED_ELEMENT_BYTES.get(scheme.kind)
    quantized = list(layer_quantized_linears(group, scheme)) if transformers_quantizes else []
    weights = sum(n * lin.in_features * lin.out_features for n, lin in quantized)
    floating = group.params - group.fp32_params - weights
    return (weights * width if width else 0) + floating * scheme.float_bytes + group.fp32_params * FP32


def placement_linear_size(lin, scheme: Scheme, transformers_quantizes: bool) -> float:
    """A linear outside the layers (OPT's projections) as transformers sizes it: bitsandbytes' element width for
    the weight it replaces, the float width for the bias."""
    width = QUANTIZED_ELEMENT_BYTES.get(scheme.kind) if transformers_quantizes else None
    weight = lin.in_features * lin.out_features
    return weight * (width or scheme.float_bytes) + (lin.params - weight) * scheme.float_bytes


def model_modules(spec: ArchSpec, scheme: Scheme) -> list[_Module]:
    """The model's top-level modules in transformers' order: the base model (each embedding module, the
    projections, the decoder layers, the final norm), then the output head. Buffers (rotary tables, a few hundred
    bytes) are left out."""
    quantizes = spec.model_type not in SUBCLASSED_LINEAR_TYPES
    width = scheme.float_bytes
    tied = spec.lm_head is None
    parts = spec.embedding_parts or (spec.embedding_params,)
    # NOTE: a tied head shares the token embeddings' weight: the first embedding module
    embeds = [_Module("base.embed" if i == 0 else f"base.embed_{i}", n * width,
                      tied="head" if tied and i == 0 else None, params=n, weights_bytes=n * width)
              for i, n in enumerate(parts)]
    extras = [_Module(f"base.{lin.name}", placement_linear_size(lin, scheme, quantizes), params=lin.params,
                      weights_bytes=linear_bytes(lin, scheme, scheme.quantized)) for lin in spec.extra_linears]
    layers = [_Module(f"base.layers.{i}", placement_layer_size(group, scheme, quantizes), no_split=True, layer=True,
                      params=group.params, weights_bytes=layer_bytes(group, scheme))
              for i, group in enumerate(g for g in spec.groups for _ in range(g.count))]
    norm = _Module("base.norm", spec.final_norm_params * width, params=spec.final_norm_params,
                   weights_bytes=spec.final_norm_params * width)
    head_params = 0 if tied else spec.lm_head.params  # tied: the embeddings' own weight, counted there
    head = _Module("head", head_params * width, tied="base.embed" if tied else None, params=head_params,
                   weights_bytes=head_params * width)
    stack = _parent("base.layers", layers)
    body = [norm, stack] if spec.model_type in FINAL_NORM_FIRST_TYPES else [stack, norm]
    return [_parent("base", [*embeds, *extras, *body]), head]


def largest_module(modules: list[_Module]) -> tuple[float, list[str]]:
    """accelerate's `get_max_layer_size`: the largest module that is a leaf or may not be split, and every module
    of that size."""
    largest, names = 0, []
    todo = list(modules)
    while todo:
        module = todo.pop(0)
        if not module.children or module.no_split:
            if module.size > largest:
                largest, names = module.size, [module.name]
            elif module.size == largest:
                names.append(module.name)
        else:
            todo = module.children + todo
    return largest, names


def _inside(name: str, outer: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def _tied_entries(module: _Module, todo: list[_Module]) -> list[_Module]:
    """The modules still to place that hold weights tied to a weight inside `module` (from outside it)."""
    partners = [m.tied for m in module.walk() if m.tied and not _inside(m.tied, module.name)]
    entries: list[_Module] = []
    for partner in partners:
        entry = next((m for m in todo if _inside(partner, m.name)), None)
        if entry is not None and entry not in entries:
            entries.append(entry)
    return entries


def assign(modules: list[_Module], budgets: dict[int | str, float]) -> dict[str, int | str]:
    """transformers' `infer_auto_device_map` over `modules`: module name → device key."""
    devices = list(budgets) + [DISK]
    gpus = [d for d in devices if isinstance(d, int)]
    main = [gpus[0], CPU] if gpus else [CPU]
    todo, placed, current = list(modules), {}, 0
    used = dict.fromkeys(devices, 0.0)
    largest, largest_names = largest_module(todo)
    while todo:
        module = todo.pop(0)
        largest_names = [n for n in largest_names if not _inside(n, module.name)]
        if not largest_names:
            largest, largest_names = largest_module(todo)
        tied = _tied_entries(module, todo)
        with_ties = module.size + sum(m.size for m in tied)
        device = devices[current]
        limit = None if device == DISK else budgets[device]
        reserved = largest if device in main else 0
        if limit is not None:
            limit -= reserved
        if limit is None or used[device] + with_ties <= limit:
            used[device] += with_ties
            for member in [module, *tied]:
                if member in todo:
                    todo.remove(member)
                placed[member.name] = device
            continue
        if tied and used[device] + module.size <= limit:
            splittable = next((m for m in tied if m.children and not m.no_split), None)
            if splittable is not None:
                at = todo.index(splittable)
                todo = [module] + todo[:at] + splittable.children + todo[at + 1:]
                largest, largest_names = largest_module(todo)
                continue
        if module.children and not module.no_split:
            todo = module.children + todo
            largest, largest_names = largest_module(todo)
            continue
        used[device] += reserved
        current += 1
        todo.insert(0, module)
    return placed


def balanced_budgets(budgets: dict[int | str, float], modules: list[_Module]) -> dict[int | str, float]:
    """transformers' `get_balanced_memory`: every GPU but the last capped at its share of the model plus a buffer
    of 1.25 × the largest decoder layer or leaf module (the embeddings, usually)."""
    gpus = sorted(k for k, v in budgets.items() if isinstance(k, int) and v > 0)
    if not gpus:
        return budgets
    total = sum(m.size for m in modules)
    sizes = [m.size for root in modules for m in root.walk() if m.layer or not m.children]
    per_gpu = total // len(gpus) + int(BALANCE_BUFFER * max(sizes, default=0))
    return {k: (min(per_gpu, v) if k in gpus[:-1] else v) for k, v in budgets.items()}


def ordered_budgets(max_memory: Mapping[str, int]) -> dict[int | str, float]:
    """accelerate's `get_max_memory` order: GPUs by index, then cpu."""
    keyed = {accelerate_key(label): float(size) for label, size in max_memory.items()}
    gpus = sorted(k for k in keyed if isinstance(k, int))
    return {k: keyed[k] for k in gpus + [k for k in (CPU,) if k in keyed]}


def load_refusal(scheme: Scheme, params: Mapping[str, int]) -> str | None:
    """Why transformers refuses to load a split (device label → parameters there), or None: bitsandbytes'
    schemes with layers on the CPU or disk beside a GPU or the disk (`validate_environment`: only
    `llm_int8_enable_fp32_cpu_offload`, which keeps the offloaded layers unquantized, allows it; falconbench does
    not set it). A model wholly on the CPU loads."""
    if not scheme.quantized:
        return None
    devices = {label for label, n in params.items() if n}
    offloaded = [label for label in (CPU, DISK) if label in devices]
    if devices == {CPU} or not offloaded:
        return None
    return f"bitsandbytes layers on {'/'.join(offloaded)}"


def plan_placement(spec: ArchSpec, scheme: Scheme, device_map: str, max_memory: Mapping[str, int]) -> Placement:
    """The placement transformers will choose for `spec` in `scheme` under `device_map` and `max_memory`
    ({"0": bytes, "cpu": bytes}): decoder layers, parameters and weight bytes per device."""
    check_device_map(device_map, max_memory, "cuda")
    modules = model_modules(spec, scheme)
    budgets = ordered_budgets(max_memory)
    if device_map in BALANCED_MAPS:
        budgets = balanced_budgets(budgets, modules)
    if scheme.quantized:
        budgets = {k: v * QUANTIZED_MEMORY_SHARE for k, v in budgets.items()}
    placed = assign(modules, budgets)
    placement = summarize(device_map, placed, modules, list(budgets) + [DISK])
    return replace(placement, refused=load_refusal(scheme, placement.params))


def summarize(device_map: str, placed: dict[str, int | str], modules: list[_Module],
              devices: list[int | str]) -> Placement:
    """Per device: layers, parameters and bytes of every module, each under the nearest placed ancestor."""
    layers = dict.fromkeys(devices, 0)
    params = dict.fromkeys(devices, 0)
    weights = dict.fromkeys(devices, 0)

    def visit(module: _Module, device: int | str | None) -> None:
        device = placed.get(module.name, device)
        if module.layer or not module.children:
            layers[device] += int(module.layer)
            params[device] += module.params
            weights[device] += module.weights_bytes
            return
        for child in module.children:
            visit(child, device)

    for module in modules:
        visit(module, None)
    used = [d for d in devices if layers.get(d) or params.get(d)]
    return Placement(device_map, {device_label(d): layers[d] for d in used},
                     {device_label(d): params[d] for d in used}, {device_label(d): weights[d] for d in used})
