"""Building and loading models in a scheme, and quantizing them through bitsandbytes' public modules.

Two sources: real weights from a folder (transformers' `from_pretrained` with an explicit BitsAndBytesConfig),
or random weights built from config.json on the meta device and materialized straight in the target dtype,
layer by layer, each linear layer quantized as soon as it exists (so the float model never exists whole).

NOTE: transformers 5 swaps a module for a bitsandbytes one only when `type(module) is nn.Linear`; Falcon's
`FalconLinear` subclasses nn.Linear and is left in 16 bits without an error. falconbench quantizes every linear
layer transformers left behind (except the output head, which transformers keeps in float too) with
bitsandbytes' own `Linear8bitLt`/`Linear4bit`, and counts what was quantized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import RunError
from ..schemes import BLOCKSIZE_4BIT, Scheme
from ..sources import ModelSource
from .config import RunConfig, quantization_settings
from .trackers import timed

CPU_4BIT_BLOCK_N = 32  # bitsandbytes' CPU 4-bit kernel packs output features in blocks of 32


@dataclass
class LoadedModel:
    """A model ready to run, with what loading it cost and how it was quantized."""

    model: Any
    seconds: dict[str, float] = field(default_factory=dict)  # read / build / materialize / quantize
    quantized_by: dict[str, int] = field(default_factory=dict)  # {"transformers": n, "falconbench": m}


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def bnb_config(scheme: Scheme, int8_threshold: float):
    """The explicit BitsAndBytesConfig of `scheme`."""
    from transformers import BitsAndBytesConfig

    kwargs = dict(quantization_settings(scheme, int8_threshold))
    if scheme.kind == "4bit":
        kwargs["bnb_4bit_compute_dtype"] = torch_dtype(kwargs["bnb_4bit_compute_dtype"])
        kwargs["bnb_4bit_quant_storage"] = torch_dtype(kwargs["bnb_4bit_quant_storage"])
    return BitsAndBytesConfig(**kwargs)


def target_linears(model) -> list[tuple[str, Any]]:
    """Every nn.Linear (subclasses and bitsandbytes' too) except the output head, in module order."""
    import torch

    head = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def is_quantized(module) -> bool:
    """Whether a linear layer holds bitsandbytes-quantized weights (int8 rows or packed 4-bit)."""
    import bitsandbytes as bnb
    import torch

    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.dtype == torch.int8
    if isinstance(module, bnb.nn.Linear4bit):
        return bool(getattr(module.weight, "bnb_quantized", False))
    return False


def count_quantized(model) -> tuple[int, int]:
    """(quantized, total) linear layers, output head excluded."""
    layers = target_linears(model)
    if not any(type(m).__module__.startswith("bitsandbytes") for _, m in layers):
        return 0, len(layers)
    return sum(is_quantized(m) for _, m in layers), len(layers)


# A float block of more than this share of the parameters, beyond the embeddings and the output head, is named.
LARGE_FLOAT_BLOCK_SHARE = 0.02


@dataclass(frozen=True)
class ParameterCensus:
    """Who holds the parameters of a loaded model: bitsandbytes (quantized) or float tensors, and which large float
    blocks remain besides the embeddings and the output head (fused MoE experts, say)."""

    params: int
    quantized_params: int
    float_blocks: tuple[tuple[str, int], ...]  # (module path with layer indices as *, parameters)

    @property
    def quantized_share(self) -> float:
        return self.quantized_params / self.params if self.params else 0.0


def parameter_census(model) -> ParameterCensus:
    """Count parameters by holder; a quantized weight counts its logical in × out elements, not its packed bytes."""
    import re

    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    quantized = total = 0
    blocks: dict[str, int] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        holds_quantized = is_quantized(module)
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if holds_quantized and param_name == "weight":
                n = module.in_features * module.out_features
                quantized += n
            else:
                n = param.numel()
                if id(param) not in embeddings:
                    block = re.sub(r"\.\d+(\.|$)", r".*\1", name)
                    blocks[block] = blocks.get(block, 0) + n
            total += n
    large = tuple(sorted(((b, n) for b, n in blocks.items() if n > LARGE_FLOAT_BLOCK_SHARE * total),
                         key=lambda item: -item[1]))
    return ParameterCensus(total, quantized, large)


def check_cpu_4bit_shapes(layers: list[tuple[str, int]], block_n: int = CPU_4BIT_BLOCK_N) -> None:
    """Refuse layers whose output features bitsandbytes' CPU 4-bit kernel cannot pack.

    bitsandbytes 0.4x-0.5x asserts `N % block_n == 0` ("N must be divisible by block_n") at the first forward
    on CPUs with AVX512-BF16; this names the layers before anything runs.
    """
    bad = [(name, out) for name, out in layers if out % block_n]
    if bad:
        shown = ", ".join(f"{name} ({out} outputs)" for name, out in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise RunError(f"bitsandbytes' CPU 4-bit kernel needs every layer's output features to be a multiple of "
                       f"{block_n} (it would stop with 'N must be divisible by block_n'), and these are not: "
                       f"{shown}{more}. Run this model in 4 bits on CUDA, or use bf16/fp16/int8 on CPU")


def check_cpu_4bit(model, config: RunConfig) -> None:
    """On a CPU that repacks 4-bit weights, check every layer to be quantized before anything runs."""
    if config.device == "cpu" and config.scheme.kind == "4bit" and cpu_packs_4bit():
        check_cpu_4bit_shapes([(name, m.out_features) for name, m in target_linears(model)])


def cpu_packs_4bit() -> bool:
    """Whether this CPU takes bitsandbytes' repacked 4-bit path (the one with the block_n assertion)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def to_bnb(linear, scheme: Scheme, int8_threshold: float):
    """A bitsandbytes layer holding `linear`'s weights quantized in `scheme`, on the weights' device."""
    import bitsandbytes as bnb
    import torch

    weight, bias = linear.weight.data, linear.bias
    shape = (linear.in_features, linear.out_features)
    if scheme.kind == "int8":
        layer = bnb.nn.Linear8bitLt(*shape, bias=bias is not None, has_fp16_weights=False,
                                    threshold=int8_threshold, device="meta")
        # The public quantizer Int8Params uses itself: int8 rows and one fp32 scale (SCB) per output row.
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        layer.weight = bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales)
        bias_dtype = torch.float16
    else:
        compute = torch_dtype(scheme.torch_dtype)
        layer = bnb.nn.Linear4bit(*shape, bias=bias is not None, compute_dtype=compute,
                                  compress_statistics=scheme.double_quant, quant_type=scheme.quant_type,
                                  quant_storage=torch.uint8, device="meta")
        params = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=BLOCKSIZE_4BIT,
                                   compress_statistics=scheme.double_quant, quant_type=scheme.quant_type,
                                   quant_storage=torch.uint8, module=layer)
        layer.weight = params.to(weight.device)  # Params4bit quantizes on its first move to a real device
        bias_dtype = compute
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.data.to(bias_dtype), requires_grad=False)
    return layer


def replace_module(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_remaining(model, scheme: Scheme, int8_threshold: float) -> int:
    """Quantize every target linear layer that is not quantized yet; return how many were."""
    done = 0
    for name, module in target_linears(model):
        if type(module).__module__.startswith("bitsandbytes"):
            continue
        replace_module(model, name, to_bnb(module, scheme, int8_threshold))
        done += 1
    return done


def hf_config(source: ModelSource, trust_remote_code: bool = False):
    """A transformers config object from the source's config.json (its own code only when trusted)."""
    from transformers import AutoConfig

    if trust_remote_code and "auto_map" in source.config:
        return AutoConfig.from_pretrained(str(source.folder), trust_remote_code=True)
    config = dict(source.config)
    model_type = config.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError) as exc:
        raise RunError(f"{source.name}: transformers cannot build model_type {model_type!r} ({exc}). "
                       "Use a config.json with a model_type transformers knows") from None


def import_libraries(config: RunConfig, source: ModelSource) -> None:
    """Import everything loading and running will touch, so imports never count as load time or memory."""
    import accelerate  # noqa: F401
    from transformers import AutoModelForCausalLM

    hf = hf_config(source, config.trust_remote_code)
    if type(hf) in AutoModelForCausalLM._model_mapping:
        AutoModelForCausalLM._model_mapping[type(hf)]  # imports the architecture's module
    if config.scheme.quantized:
        import bitsandbytes  # noqa: F401


def load_model(config: RunConfig, source: ModelSource, synchronize) -> LoadedModel:
    """Load or build the model of `config` on its device, quantized per its scheme."""
    if config.random_weights:
        return build_random(config, source, synchronize)
    return load_pretrained(config, source, synchronize)


def load_pretrained(config: RunConfig, source: ModelSource, synchronize) -> LoadedModel:
    """transformers' `from_pretrained` with the scheme's explicit BitsAndBytesConfig, then the quantization
    transformers skipped (Falcon's FalconLinear)."""
    from transformers import AutoModelForCausalLM

    scheme = config.scheme
    # NOTE: safetensors only (torch.load of a pickle can run code) and no remote code, unless the user said so.
    from .devicemap import from_pretrained_kwargs

    kwargs: dict[str, Any] = {"dtype": torch_dtype(scheme.torch_dtype), **from_pretrained_kwargs(config),
                              "use_safetensors": None if config.allow_pickle else True,
                              "trust_remote_code": config.trust_remote_code,
                              "attn_implementation": config.attn_impl}
    if scheme.quantized:
        kwargs["quantization_config"] = bnb_config(scheme, config.int8_threshold)
    model, read = timed(lambda: AutoModelForCausalLM.from_pretrained(str(source.folder), **kwargs), synchronize)
    loaded = LoadedModel(model.eval(), {"read": read})
    check_cpu_4bit(model, config)
    if scheme.quantized:
        before, _ = count_quantized(model)
        extra, seconds = timed(lambda: quantize_remaining(model, scheme, config.int8_threshold), synchronize)
        loaded.quantized_by = {"transformers": before, "falconbench": extra}
        loaded.seconds["quantize"] = seconds  # what transformers quantized is inside "read"
    return loaded


def build_random(config: RunConfig, source: ModelSource, synchronize) -> LoadedModel:
    """The architecture with random weights created directly in the target dtype on the target device."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    scheme = config.scheme
    start = time.perf_counter()
    hf = hf_config(source, config.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch_dtype(scheme.torch_dtype),
                                                 trust_remote_code=config.trust_remote_code,
                                                 attn_implementation=config.attn_impl)
    model.tie_weights()
    seconds = {"build": time.perf_counter() - start}
    targets = {name for name, _ in target_linears(model)} if scheme.quantized else set()
    check_cpu_4bit(model, config)
    generator = torch.Generator(config.device).manual_seed(config.seed)
    std = float(getattr(hf, "initializer_range", 0.02))
    quantize_seconds = 0.0
    start = time.perf_counter()
    made: dict[int, tuple[Any, Any]] = {}  # tied parameters are one object on meta: materialize each once
    for name, module in list(model.named_modules()):
        meta_ids = [id(p) for p in module.parameters(recurse=False)]
        materialize(module, config.device, generator, std, made)
        if name in targets:
            layer, took = timed(lambda m=module: to_bnb(m, scheme, config.int8_threshold), synchronize)
            replace_module(model, name, layer)
            quantize_seconds += took
            for key in meta_ids:  # let the float weights go (the module list above still holds the module)
                made.pop(key, None)
            module._parameters.clear()
    move_buffers(model, config.device)
    model.tie_weights()
    synchronize()
    seconds["materialize"] = time.perf_counter() - start - quantize_seconds
    if targets:
        seconds["quantize"] = quantize_seconds
    return LoadedModel(model.eval(), seconds, {"falconbench": len(targets)} if targets else {})


def move_buffers(model, device: str) -> None:
    """Move buffers (rotary frequencies, built on the CPU) to `device`, leaving bitsandbytes' parameters be."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != device:
                module._buffers[name] = buffer.to(device)


def materialize(module, device: str, generator, std: float, made: dict[int, tuple[Any, Any]]) -> None:
    """Replace `module`'s own meta parameters with random ones in their dtype: N(0, std) for matrices, the
    identity of a norm (ones, zero bias) for vectors, as models initialise them."""
    import torch

    for name, param in list(module.named_parameters(recurse=False)):
        if param.device.type != "meta":
            continue
        if id(param) not in made:
            data = torch.empty(param.shape, dtype=param.dtype, device=device)
            if data.dim() > 1:
                data.normal_(0.0, std, generator=generator)
            else:
                data.fill_(1.0 if name == "weight" else 0.0)
            # the meta parameter is kept too, so its id is not reused while the entry lives
            made[id(param)] = (param, torch.nn.Parameter(data, requires_grad=False))
        module._parameters[name] = made[id(param)][1]
