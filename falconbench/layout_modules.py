"""Reading a causal LM's module tree, built on the meta device, into an ArchSpec (the general path of `layout.py`).

Every parameter is placed once: in a quantized linear (what transformers' own bitsandbytes integration replaces,
plus the nn.Linear subclasses falconbench's loader quantizes), a fused expert (3-D), a float32-kept parameter
(`_keep_in_fp32_modules_strict`) or a floating-point one; identical decoder layers are grouped; each layer's cache
follows transformers' own `get_layer_types_and_kwargs` and the layer's modules.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .errors import ConfigError
from .libraries import installed_version
from .spec import ArchSpec, CacheLayout, Experts, LayerGroup, Linear, positive_int, with_warnings

ORIGIN = "transformers {version} meta-device layout"
# transformers' cache layer types → falconbench's cache kinds (chunked attention is a sliding window to the cache).
ATTENTION_KINDS = {"full_attention": "full_attention", "sliding_attention": "sliding_attention",
                   "chunked_attention": "sliding_attention", "hybrid": "full_attention",
                   "hybrid_sliding": "sliding_attention", "indexed_attention": "full_attention"}
RECURRENT_TYPES = ("linear_attention", "conv", "hybrid", "hybrid_sliding")


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
    outside = dict(before=0, after=0, extra=[], fp32=0, parts=[])
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
                if not seen_layers:  # one entry per embedding module, in module order
                    parts = outside["parts"]
                    if parts and parts[-1][0] == module_name:
                        parts[-1][1] += param.numel()
                    else:
                        parts.append([module_name, param.numel()])
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
        embedding_parts=tuple(n for _, n in outside["parts"]) if len(outside["parts"]) > 1 else (),
        lm_head=Linear("lm_head", head.in_features, head.out_features, head.bias is not None) if head else None,
        intermediate_size=config_field(text, "intermediate_size") or 4 * text.hidden_size,
        extra_linears=tuple(outside["extra"]),
        num_kv_heads=kv_heads if positive_int(kv_heads) and positive_int(heads) and heads % kv_heads == 0 else 0,
        head_dim=config_field(text, "head_dim") or text.hidden_size // heads,
        max_positions=config_field(text, "max_position_embeddings"),
        origin=ORIGIN.format(version=installed_version("transformers")),
    )
