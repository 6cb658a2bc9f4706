"""The oracle over the installed transformers' causal-LM catalog, shared by tests/test_catalog.py and
benchmarks/catalog_coverage.py.

For one model type: build its default config on the meta device and count, from the modules themselves, the
parameters and their bytes in bf16, int8 and nf4 (what transformers' bitsandbytes integration replaces, by its own
`replace_with_bnb_linear`); then shrink the config (few layers, small widths, the same layer types and a small
window), run a real prefill longer than the window and one decode step on CPU, and read the cache object's bytes.
Each figure is compared with the planner's, from the hand-written reader if one covers the type and from the
general path (`falconbench.layout`).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from falconbench import layout, layout_modules
from falconbench.families import READERS
from falconbench.planner import kv_cache_bytes, quantized_params, weights_bytes
from falconbench.run import footprint
from falconbench.schemes import FP32, get_scheme
from falconbench.spec import spec_from_config

transformers.logging.set_verbosity_error()
# NOTE: one thread: tiny bf16 matmuls on a shared 2-core machine run 20x slower with two threads contending.
torch.set_num_threads(1)
SCHEMES = ("bf16", "int8", "nf4")
PROMPT_TOKENS = 12  # longer than the shrunken window
WINDOW = 8
SMALL_LAYERS = 2  # at least; more when the layer types need more to all appear
# Widths of the shrunken copy, each set only where the default config has the field. Chosen so widths stay
# consistent: hidden = heads × head_dim, Mamba-2's heads × head = expand × hidden.
SMALL = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "n_embed": 64, "intermediate_size": 128, "ffn_hidden_size": 128,
    "n_inner": 128, "ffn_dim": 128, "num_attention_heads": 4, "n_head": 4, "n_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 16, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "kv_lora_rank": 16,
    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "vocab_size": 512,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 32,
    "mamba_d_ssm": 128, "time_step_rank": 4, "max_position_embeddings": 256, "rotary_dim": 8,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4,
}
SMALL_PARAMS_LIMIT = 120_000_000  # a bigger shrunken copy (an untouched vision or audio tower) is not run on CPU
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


@functools.lru_cache(maxsize=None)
def cached_verdict(model_type: str) -> "Verdict":
    return verdict(model_type)


@dataclass
class Verdict:
    """What the oracle found for one model type: None where equal, else the reason."""

    model_type: str
    builds: str | None = None  # why the default config does not build on the meta device
    weights: str | None = None
    kv: str | None = None
    reader: bool = False
    labelled: str = ""  # the general path's own label of its layout: exact or estimate

    @property
    def exact(self) -> bool:
        return self.builds is None and self.weights is None and self.kv is None

    def wrong(self, origin: str) -> bool:
        """Whether the oracle found a number of `origin` ("reader" or "general path") that differs."""
        return any(r and f"{origin}:" in r for r in (self.weights, self.kv))


def catalog() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def quiet(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


def meta_model(config):
    with torch.device("meta"):
        model = quiet(lambda: transformers.AutoModelForCausalLM.from_config(config))
    model.tie_weights()  # not applied for you on the meta device
    return model


def fp32_names(model):
    """Whether a parameter stays float32 in a bf16 load: transformers' own dtype plan, matched as it matches it."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(torch.bfloat16)
    pattern = build_glob_alternation(list(plan))[0] if plan else None
    return lambda name: pattern is not None and pattern.search(name) is not None


@dataclass
class Reference:
    """What transformers builds: parameters, bytes per scheme, and the weights bitsandbytes holds."""

    params: int
    bytes: dict
    quantized_weights: int


def reference_layout(model) -> Reference:
    """Counted from the modules after transformers' own `replace_with_bnb_linear` (with its
    `get_keys_to_not_convert`), plus the nn.Linear subclasses falconbench's loader quantizes: bitsandbytes layers'
    weights in the scheme's storage, `_keep_in_fp32_modules_strict` in float32, the rest at the float width."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    params, fp32 = sum(p.numel() for p in model.parameters()), fp32_names(model)
    replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model),
                            quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    head = model.get_output_embeddings()
    bnb_names = {n for n, m in model.named_modules()
                 if isinstance(m, bnb.nn.Linear8bitLt) or (isinstance(m, torch.nn.Linear) and m is not head)}
    quantized = {id(m.weight): m.in_features * m.out_features for n, m in model.named_modules() if n in bnb_names}
    totals, seen = dict.fromkeys(SCHEMES, 0), set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            for name in SCHEMES:
                scheme = get_scheme(name)
                if scheme.quantized and module_name in bnb_names and param_name == "weight":
                    totals[name] += scheme.linear_weight_bytes(module.in_features, module.out_features)
                elif fp32(f"{module_name}.{param_name}"):
                    totals[name] += param.numel() * FP32
                else:
                    totals[name] += param.numel() * scheme.float_bytes
    return Reference(params, totals, sum(quantized.values()))  # a weight tied between layers is held once


def check_weights(specs: dict, reference: Reference) -> str | None:
    for origin, spec in specs.items():
        if spec.param_count != reference.params:
            return f"{origin}: {spec.param_count:,} parameters planned, {reference.params:,} built"
        for name in SCHEMES:
            scheme = get_scheme(name)
            if weights_bytes(spec, scheme) != reference.bytes[name]:
                return (f"{origin}: {name} weights {weights_bytes(spec, scheme):,} B planned, "
                        f"{reference.bytes[name]:,} B built")
            if quantized_params(spec, scheme) != (reference.quantized_weights if scheme.quantized else 0):
                return f"{origin}: {name} quantized parameters differ"
    return None


def default_config(model_type: str):
    return quiet(lambda: transformers.AutoConfig.for_model(model_type))


def small_config(model_type: str):
    """The default config with few layers, small widths, the same layer types and a window of WINDOW tokens."""
    default = default_config(model_type)
    text = default.get_text_config(decoder=True)
    data = {k: v for k, v in text.to_dict().items()}
    for key, value in SMALL.items():
        if isinstance(data.get(key), int) and not isinstance(data.get(key), bool):
            data[key] = value
    if isinstance(data.get("qk_rope_head_dim"), int) and "head_dim" in data:
        data["head_dim"] = data["qk_rope_head_dim"]  # MLA's rotary part is its head_dim
    types = getattr(text, "layer_types", None)
    layers = SMALL_LAYERS
    if types:
        layers = max(layers, max(types.index(kind) for kind in set(types)) + 1)
    default_layers = next((data[k] for k in LAYER_FIELDS if isinstance(data.get(k), int)), None)
    for key, value in list(data.items()):
        if isinstance(value, list) and len(value) == default_layers and default_layers > layers:
            data[key] = value[:layers]  # per-layer lists: layer_types, mlp_layer_types, ...
    if data.get("is_decoder") is False:
        data["is_decoder"] = True  # encoder families cache only as decoders, as their causal-LM class requires
    if "num_experts_per_tok" in data and data["num_experts_per_tok"] is None:
        data["num_experts_per_tok"] = SMALL["num_experts_per_tok"]
    for key in LAYER_FIELDS:
        if isinstance(data.get(key), int):
            data[key] = layers
    for key in ("sliding_window", "attention_chunk_size"):
        if isinstance(data.get(key), int):
            data[key] = WINDOW
    for key, value in list(data.items()):
        if key.endswith(("_token_id", "_token_index")) and isinstance(value, int) and value >= SMALL["vocab_size"]:
            data[key] = SMALL["vocab_size"] - 1
    data.pop("model_type", None)
    return quiet(lambda: transformers.AutoConfig.for_model(text.model_type, **data))


def measured_cache_bytes(config) -> tuple[int, int, object]:
    """Bytes the cache object holds after a bf16 prefill of PROMPT_TOKENS and after one decode step, and the
    model that held it."""
    torch.manual_seed(0)
    model = quiet(lambda: transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)).eval()
    ids = torch.randint(0, min(config.get_text_config(decoder=True).vocab_size, 256), (1, PROMPT_TOKENS))
    with torch.no_grad():
        out = quiet(lambda: model(input_ids=ids, use_cache=True))
        cache = footprint.cache_output(out)
        prefill = footprint.kv_cache_bytes(cache)
        out = quiet(lambda: model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True))
        decode = footprint.kv_cache_bytes(footprint.cache_output(out))
    return prefill, decode, model


def planned_cache_bytes(spec, context: int) -> int:
    return kv_cache_bytes(spec, context, 1, kv_bytes=2, state_bytes=2)


def specs_of(model_type: str, config, model) -> dict:
    """The general path's spec (from `model`, which it then leaves bitsandbytes-replaced) and the reader's."""
    specs = {"general path": layout_modules.spec_from_model(model, config, model_type)}
    if model_type in READERS:
        specs["reader"] = spec_from_config({**config.to_dict(), "model_type": model_type}, model_type)
    return specs


def check_kv(model_type: str) -> str | None:
    try:
        config = small_config(model_type)
        size = sum(p.numel() for p in meta_model(config).parameters())
        if size > SMALL_PARAMS_LIMIT:
            return f"the shrunken copy keeps {size / 1e6:.0f}M parameters (parts the shrink does not reach), not run"
        prefill, decode, model = measured_cache_bytes(config)
    except Exception as exc:  # noqa: BLE001 - recorded as the reason, listed by the coverage script
        return f"the shrunken copy does not run ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})"
    specs = specs_of(model_type, config, model)  # the layout is the same on the CPU as on the meta device
    for origin, spec in specs.items():
        planned = (planned_cache_bytes(spec, PROMPT_TOKENS), planned_cache_bytes(spec, PROMPT_TOKENS + 1))
        # NOTE: a sliding layer's keys after prefill are a view of the whole prompt's tensor, whose storage stays
        # held until the first decode step; from then on it holds the window the plan counts.
        held = (decode,) if spec.sliding_window else (prefill, decode)
        planned = planned[1:] if spec.sliding_window else planned
        if planned != held:
            steps = "decode" if spec.sliding_window else "prefill / decode"
            return (f"{origin}: cache {' / '.join(f'{b:,}' for b in planned)} B planned after {steps}, "
                    f"{' / '.join(f'{b:,}' for b in held)} B held")
    return None


def verdict(model_type: str) -> Verdict:
    result = Verdict(model_type, reader=model_type in READERS)
    try:
        config = default_config(model_type)
        model = meta_model(config)
    except Exception as exc:  # noqa: BLE001
        result.builds = f"{type(exc).__name__}: {' '.join(str(exc).split())[:100]}"
        return result
    reference = reference_layout(model)  # first: the general path then reads the model transformers converted
    try:
        specs = specs_of(model_type, config, model)
    except Exception as exc:  # noqa: BLE001
        result.weights = f"the general path cannot lay it out ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})"
        return result
    general = specs["general path"]
    result.labelled = general.exactness
    if layout.spec_from_dict(asdict(general)) != general:
        result.weights = "the cached JSON layout differs from the derived one"
    result.weights = result.weights or check_weights(specs, reference)
    result.kv = check_kv(model_type)
    return result
