"""The general path: any causal LM the installed transformers ships, laid out from its own modules on the meta device.

`layout_spec` builds the model from its config with no memory (`torch.device("meta")`), reads which modules the
installed transformers' bitsandbytes integration would replace (its own `replace_with_bnb_linear` with
`get_keys_to_not_convert`, plus the nn.Linear subclasses falconbench's loader quantizes), which parameters are fused
experts (3-D), what is tied and what `_keep_in_fp32_modules_strict` keeps in float32, and groups identical decoder
layers. What each layer caches follows transformers' own rule (`cache_utils.get_layer_types_and_kwargs`). The
result is cached as JSON under falconbench's cache folder, keyed by the config's digest and the transformers
version, so the next plan of that config imports no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .libraries import installed_version
from .spec import ArchSpec, CacheLayout, Experts, LayerGroup, Linear, positive_int, with_warnings

LAYOUT_FORMAT = 1  # bump when the JSON shape or the derivation changes: older files are then ignored
ORIGIN = "transformers {version} meta-device layout"
# transformers' cache layer types → falconbench's cache kinds (chunked attention is a sliding window to the cache).
ATTENTION_KINDS = {"full_attention": "full_attention", "sliding_attention": "sliding_attention",
                   "chunked_attention": "sliding_attention", "hybrid": "full_attention",
                   "hybrid_sliding": "sliding_attention", "indexed_attention": "full_attention"}
RECURRENT_TYPES = ("linear_attention", "conv", "hybrid", "hybrid_sliding")


def layouts_dir() -> Path:
    from .zoo import cache_root

    return cache_root() / "layouts" / f"transformers-{installed_version('transformers') or 'none'}"


def layout_path(config: dict[str, Any]) -> Path:
    from .sources import config_digest

    return layouts_dir() / f"{config_digest(config)}.json"


def cached_layout(config: dict[str, Any], name: str) -> ArchSpec | None:
    """The layout derived earlier for this exact config under this transformers version, or None."""
    try:
        data = json.loads(layout_path(config).read_text(encoding="utf-8"))
        if data.get("format") != LAYOUT_FORMAT:
            return None
        return replace(spec_from_dict(data["spec"]), name=name)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or unreadable: derive it again


def store_layout(config: dict[str, Any], spec: ArchSpec) -> None:
    """Write the layout atomically; a cache folder that cannot be written only costs the next plan its speed."""
    path = layout_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"format": LAYOUT_FORMAT, "spec": asdict(spec)}), encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        pass


def spec_from_dict(data: dict[str, Any]) -> ArchSpec:
    """The inverse of `dataclasses.asdict` on an ArchSpec."""
    groups = tuple(LayerGroup(
        count=g["count"], linears=tuple(Linear(**lin) for lin in g["linears"]), float_params=g["float_params"],
        caches=tuple(CacheLayout(**c) for c in g["caches"]), fp32_params=g["fp32_params"],
        experts=tuple(Experts(e["name"], e["num_experts"], tuple(Linear(**lin) for lin in e["linears"]),
                              e["fused_since_v4"]) for e in g["experts"]),
    ) for g in data["groups"])
    head = Linear(**data["lm_head"]) if data["lm_head"] else None
    return ArchSpec(**{**data, "groups": groups, "lm_head": head, "warnings": tuple(data["warnings"]),
                       "extra_linears": tuple(Linear(**lin) for lin in data["extra_linears"])})


def torch_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def layout_spec(config: dict[str, Any], name: str, source: str, estimate_allowed: bool = False) -> ArchSpec | None:
    """The exact layout of a config no falconbench reader knows: cached, else built on the meta device.

    None without torch, or, when `estimate_allowed`, for a type the installed transformers does not know (the
    caller then plans a labelled estimate); a config transformers cannot build is one ConfigError.
    """
    cached = cached_layout(config, name)
    if cached is not None or not torch_available():
        return cached
    if estimate_allowed and not transformers_knows(config.get("model_type")):
        return None
    model, hf = build_meta_model(config, source)
    try:
        spec = spec_from_model(model, hf, name)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a module tree this reading does not understand: one line, no traceback
        raise ConfigError(f"{source}: falconbench cannot lay out model_type {config.get('model_type')!r} from "
                          f"transformers' modules ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    store_layout(config, spec)
    return spec


def transformers_knows(model_type: Any) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def build_meta_model(config: dict[str, Any], source: str):
    """(model on the meta device, its transformers config), or one ConfigError naming the type and the fields."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    model_type = config.get("model_type")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the core never prints; transformers' notices would
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoConfig.for_model(model_type, **fields)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf)
    except Exception as exc:  # noqa: BLE001 - whatever the config does to transformers, the user gets one line
        raise ConfigError(build_failure(model_type, config, exc, source)) from None
    finally:
        logging.set_verbosity(verbosity)
    model.tie_weights()  # not applied for you on the meta device: the head would count twice
    return model, hf


def build_failure(model_type: Any, config: dict[str, Any], exc: Exception, source: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    version = installed_version("transformers")
    model_type = model_type if isinstance(model_type, str) else repr(model_type)[:40]
    standard = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    missing = [k for k in standard if not positive_int(config.get(k))]
    lacks = f"; config.json lacks {', '.join(missing)}" if missing else ""
    if not transformers_knows(model_type):
        what = f"model_type {model_type!r} has no falconbench reader and transformers {version} does not know it"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        what = f"model_type {model_type!r} has no causal-LM class in transformers {version}"
    else:
        reason = " ".join(str(exc).split())[:160]
        what = f"transformers {version} cannot build model_type {model_type!r} ({type(exc).__name__}: {reason})"
    return (f"{source}: {what}{lacks}. Pass a complete config.json of a causal LM transformers ships, or one of "
            "the types falconbench reads itself (falconbench models list)")


def spec_from_model(model, hf_config, name: str) -> ArchSpec:
    """An ArchSpec read from a meta-device model: every parameter placed once, identical decoder layers grouped."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = hf_config.get_text_config(decoder=True)
    prefix, layers = decoder_layers(model, getattr(text, "num_hidden_layers", None))
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    tied = head_weight is not None and any(head_weight is p for p in model.get_input_embeddings().parameters())
    untied_head = head if all(hasattr(head, a) for a in ("in_features", "out_features")) and not tied else None
    per_layer, outside = place_parameters(model, prefix, len(layers), untied_head)
    configs = config_field(text, "per_layer_config") or [text] * len(layers)
    caches = [layer_caches(config, layer, kind, kwargs) for config, layer, kind, kwargs in
              zip(padded(configs, len(layers)), layers, padded(layer_types, len(layers)),
                  padded(layer_kwargs, len(layers)))]
    spec = assemble_spec(name, text, per_layer, caches, outside, untied_head)
    doubts = layout_doubts(spec, model, outside["fp32"], layer_types, layer_kwargs)
    if doubts:
        spec = replace(with_warnings(spec, f"{spec.model_type}: weights and KV cache are an ESTIMATE: "
                                     f"{'; '.join(doubts)}"), exactness="estimate")
    return spec


def place_parameters(model, prefix: str, num_layers: int, untied_head) -> tuple[list[dict], dict]:
    """Each parameter once (tied ones at their first place), into its decoder layer or outside them: quantized
    linears, fused experts, float32-kept and other floating-point parameters."""
    quantized, fp32 = quantized_modules(model), fp32_matcher(model)
    per_layer = [dict(linears=[], float_params=0, fp32_params=0, experts={}) for _ in range(num_layers)]
    outside = dict(before=0, after=0, extra=[], fp32=0)
    seen_layers, seen = False, set()
    for module_name, module in model.named_modules():
        index = layer_index(module_name, prefix)
        seen_layers |= index is not None
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if module is untied_head or not own:
            continue
        relative = module_name if index is None else module_name.split(".", prefix.count(".") + 2)[-1]
        if module_name in quantized:
            target = outside["extra"] if index is None else per_layer[index]["linears"]
            target.append(Linear(relative, module.in_features, module.out_features, module.bias is not None))
            continue
        for param_name, param in own:
            keep_fp32 = fp32(f"{module_name}.{param_name}" if module_name else param_name)
            if index is None:
                outside["after" if seen_layers else "before"] += param.numel()
                outside["fp32"] += param.numel() if keep_fp32 else 0
            elif param.dim() >= 3 and not is_convolution(module):
                add_expert(per_layer[index]["experts"], relative, param_name, param, own)
            elif not is_expert_bias(param_name, own):
                per_layer[index]["fp32_params" if keep_fp32 else "float_params"] += param.numel()
    return per_layer, outside


def layout_doubts(spec: ArchSpec, model, fp32_outside: int, layer_types, layer_kwargs) -> list[str]:
    """What this reading of the modules cannot vouch for: then the layout is labelled an estimate, never exact."""
    doubts = []
    built = sum(p.numel() for p in model.parameters())
    if spec.param_count != built:
        doubts.append(f"{spec.param_count:,} parameters placed of the {built:,} transformers builds")
    if fp32_outside:  # ArchSpec keeps float32 parameters per layer group only
        doubts.append(f"{fp32_outside:,} float32 parameters outside the decoder layers planned at the float width")
    unknown = sorted(set(layer_types) - set(ATTENTION_KINDS) - set(RECURRENT_TYPES) - {"dummy"})
    if unknown:
        doubts.append(f"cache layer types not modelled: {', '.join(unknown)}")
    if any((kwargs or {}).get("number_of_states", 1) != 1 for kwargs in layer_kwargs):
        doubts.append("layers with several recurrent states")
    if any(c.kind == "recurrent" and not c.state_elements for _, c in spec.caches):
        doubts.append("a recurrent state whose shape its modules do not give")
    return doubts


def config_field(config, name: str, default: Any = None) -> Any:
    """A config attribute, or `default` (per-layer configs refuse to give a global value of a per-layer field)."""
    try:
        value = getattr(config, name, default)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError and the like
        return default
    return default if value is None else value


def padded(items: list, length: int) -> list:
    return list(items)[:length] + [None] * (length - len(items))


def decoder_layers(model, num_layers: int | None) -> tuple[str, list]:
    """The ModuleList of decoder layers: the one as long as `num_hidden_layers` holding most parameters."""
    import torch

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of decoder layers falconbench can read")

    def weight(item):
        name, m = item
        return (len(m) == num_layers, sum(p.numel() for p in m.parameters()))

    name, layers = max(lists, key=weight)
    return name, list(layers)


def layer_index(module_name: str, prefix: str) -> int | None:
    if not module_name.startswith(prefix + "."):
        return None
    return int(module_name[len(prefix) + 1:].split(".", 1)[0])


def quantized_modules(model) -> set[str]:
    """Names of the modules held by bitsandbytes in int8/nf4: what transformers' own integration replaces, and the
    nn.Linear subclasses it skips that falconbench's loader quantizes (`run.loading.target_linears`)."""
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    quiet_import("bitsandbytes")
    head = model.get_output_embeddings()
    skipped = get_keys_to_not_convert(model) + list(model._keep_in_fp32_modules or [])
    before = {name: m for name, m in model.named_modules()}
    replace_with_bnb_linear(model, modules_to_not_convert=skipped,
                            quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    replaced = {name for name, m in model.named_modules() if before.get(name) is not m}
    return replaced | {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def quiet_import(module: str) -> None:
    """Import `module` with its log warnings silenced (bitsandbytes' CPU backend logs a missing optional kernel)."""
    import importlib
    import logging

    logger = logging.getLogger(module)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module(module)
    finally:
        logger.setLevel(level)


def fp32_matcher(model):
    """Whether a parameter stays float32 in bf16/fp16 loads, by transformers' own dtype plan and glob rule."""
    import torch
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(torch.bfloat16)
    if not plan:
        return lambda name: False
    pattern = build_glob_alternation(list(plan))[0]
    return lambda name: pattern.search(name) is not None


def is_convolution(module) -> bool:
    import torch

    return isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))


def add_expert(experts: dict, module_name: str, param_name: str, param, own) -> None:
    """A fused 3-D expert parameter (experts × out × in), with its 2-D bias if the module has one."""
    count, *rest = param.shape
    out_features, in_features = rest[0], 1
    for width in rest[1:]:
        in_features *= width
    bias = dict(own).get(f"{param_name}_bias")
    has_bias = bias is not None and tuple(bias.shape) in ((count, out_features), (count, in_features))
    if has_bias and tuple(bias.shape) == (count, in_features) and in_features != out_features:
        in_features, out_features = out_features, in_features
    linears = experts.setdefault(module_name, (count, []))[1]
    linears.append(Linear(param_name, in_features, out_features, has_bias))


def is_expert_bias(param_name: str, own) -> bool:
    shapes = dict(own)
    weight = shapes.get(param_name.removesuffix("_bias")) if param_name.endswith("_bias") else None
    return weight is not None and weight.dim() >= 3 and shapes[param_name].dim() == 2


def layer_caches(config, layer, layer_type: str | None, kwargs: dict | None) -> tuple[CacheLayout, ...]:
    """What one decoder layer caches, by transformers' layer type, the layer's config and its own modules."""
    caches = []
    if layer_type in ATTENTION_KINDS:
        kind = ATTENTION_KINDS[layer_type]
        key_width, value_width = attention_widths(config, layer)
        if layer_type == "indexed_attention":  # DynamicIndexedLayer also caches the indexer's keys, one head
            key_width += config_field(config, "index_head_dim", 0)
        window = (kwargs or {}).get("sliding_window") if kind == "sliding_attention" else None
        caches.append(CacheLayout("mla" if config_field(config, "kv_lora_rank") and kind == "full_attention"
                                  else kind, key_width, value_width, window))
    if layer_type in RECURRENT_TYPES:
        caches.append(recurrent_layout(layer))
    return tuple(caches)


def attention_widths(text, layer) -> tuple[int, int]:
    """Elements per token of the cached keys and values of one layer."""
    if config_field(text, "kv_lora_rank"):  # MLA caches the latent and the rotary key (see FACTS, DeepSeek)
        return text.kv_lora_rank, text.qk_rope_head_dim
    for module in layer.modules():
        k, v = getattr(module, "k_proj", None), getattr(module, "v_proj", None)
        if hasattr(k, "out_features") and hasattr(v, "out_features"):
            return k.out_features, v.out_features
    for module in layer.modules():
        heads = next((getattr(module, k) for k in ("num_key_value_heads", "num_kv_heads", "kv_heads")
                      if positive_int(getattr(module, k, None))), None)
        if positive_int(heads) and positive_int(getattr(module, "head_dim", None)):
            return heads * module.head_dim, heads * module.head_dim
    heads = config_field(text, "num_key_value_heads") or config_field(text, "num_attention_heads", 1)
    head_dim = config_field(text, "head_dim") or text.hidden_size // config_field(text, "num_attention_heads", 1)
    return heads * head_dim, heads * head_dim


def recurrent_layout(layer) -> CacheLayout:
    """A Mamba-style state: the depthwise convolution's window, and the SSM state (A_log's shape for Mamba-1,
    heads × head_dim × state size for Mamba-2)."""
    import torch

    conv = sum(m.in_channels * m.kernel_size[0] for m in layer.modules() if isinstance(m, torch.nn.Conv1d))
    state = 0
    for module in layer.modules():
        a_log = getattr(module, "A_log", None)
        if a_log is not None and a_log.dim() == 2:
            state = a_log.numel()
        for shape in (("num_heads", "head_dim", "ssm_state_size"), ("num_v_heads", "head_k_dim", "head_v_dim")):
            if a_log is not None and all(positive_int(getattr(module, k, None)) for k in shape):
                state = module_product(module, shape)
    return CacheLayout("recurrent", conv_elements=conv, state_elements=state)


def module_product(module, names: tuple[str, ...]) -> int:
    product = 1
    for name in names:
        product *= getattr(module, name)
    return product


def assemble_spec(name, text, per_layer, caches, outside, head) -> ArchSpec:
    groups: dict[tuple, int] = {}
    for layer, cache in zip(per_layer, caches):
        experts = tuple(Experts(module, count, tuple(linears)) for module, (count, linears) in layer["experts"].items())
        key = (tuple(layer["linears"]), layer["float_params"], cache, experts, layer["fp32_params"])
        groups[key] = groups.get(key, 0) + 1
    heads = config_field(text, "num_attention_heads", 1)
    kv_heads = config_field(text, "num_key_value_heads", heads)
    return ArchSpec(
        name=name, model_type=text.model_type, hidden_size=text.hidden_size, num_heads=heads,
        vocab_size=text.vocab_size,
        groups=tuple(LayerGroup(n, lin, fl, ca, ex, fp) for (lin, fl, ca, ex, fp), n in groups.items()),
        embedding_params=outside["before"], final_norm_params=outside["after"],
        lm_head=Linear("lm_head", head.in_features, head.out_features, head.bias is not None) if head else None,
        intermediate_size=config_field(text, "intermediate_size") or 4 * text.hidden_size,
        extra_linears=tuple(outside["extra"]),
        num_kv_heads=kv_heads if positive_int(kv_heads) and positive_int(heads) and heads % kv_heads == 0 else 0,
        head_dim=config_field(text, "head_dim") or text.hidden_size // heads,
        max_positions=config_field(text, "max_position_embeddings"),
        origin=ORIGIN.format(version=installed_version("transformers")),
    )
