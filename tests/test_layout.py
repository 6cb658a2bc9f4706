"""The hand-written readers against the module tree the installed transformers builds, on the meta device.

For every bundled profile, and for the default config of every model type a reader covers, the planner's parameter
count and its bytes in bf16, int8 and nf4 equal what transformers builds and what its bitsandbytes integration
(`replace_with_bnb_linear`, with its own `get_keys_to_not_convert`) would quantize, to the byte.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from transformers.integrations.bitsandbytes import replace_with_bnb_linear  # noqa: E402
from transformers.quantizers.base import get_keys_to_not_convert  # noqa: E402

from falconbench import get_scheme, resolve_model, spec_from_config, weights_bytes  # noqa: E402
from falconbench.families import SUPPORTED_MODEL_TYPES  # noqa: E402
from falconbench.planner import quantized_params  # noqa: E402
from falconbench.sources import model_profiles  # noqa: E402

LEGACY_TYPES = {"refinedweb", "refinedwebmodel"}  # transformers 5 no longer knows them; tests/test_spec.py reads them
SCHEMES = ("bf16", "int8", "nf4", "nf4-dq")


def meta_model(config):
    # NOTE: torch.device("meta"), not accelerate's init_empty_weights: the latter lets a module that creates its
    # parameters with torch.empty (fused experts) allocate them for real.
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # not applied for you on the meta device: the head would count twice
    return model


def quantized_names(model):
    """What transformers' bitsandbytes integration replaces (its own rule, applied to this meta model), plus the
    nn.Linear subclasses falconbench's loader quantizes itself (run/loading.py): module names holding quantized
    weights. The rule is the same for LLM.int8 and 4-bit."""
    replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model),
                            quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    head = model.get_output_embeddings()
    return {name for name, m in model.named_modules()
            if isinstance(m, bnb.nn.Linear8bitLt) or (isinstance(m, torch.nn.Linear) and m is not head)}


def dims(module):
    """(in, out) of an nn.Linear or of GPT-2's Conv1D (whose weight is stored in × out)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


def layout_bytes(model, scheme, quantized, fp32_names=()):
    """Bytes counted from the modules: quantized weights in the scheme's storage, the rest at its float width."""
    quantized = quantized if scheme.quantized else set()
    total, seen = 0, set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}"
            if module_name in quantized and param_name == "weight":
                total += scheme.linear_weight_bytes(*dims(module))
            elif any(full.endswith(name) for name in fp32_names):
                total += param.numel() * 4
            else:
                total += param.numel() * scheme.float_bytes
    return total


def check_layout(spec, make_model):
    model = make_model()
    assert spec.param_count == sum(p.numel() for p in model.parameters())
    quantized = quantized_names(make_model())
    fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    weights = sum(a * b for a, b in (dims(m) for n, m in model.named_modules() if n in quantized))
    for name in SCHEMES:
        scheme = get_scheme(name)
        assert weights_bytes(spec, scheme) == layout_bytes(model, scheme, quantized, fp32), name
        assert quantized_params(spec, scheme) == (weights if scheme.quantized else 0), name


@pytest.mark.parametrize("name", model_profiles())
def test_every_profile_matches_the_real_layout(name):
    source = resolve_model(name)
    config = transformers.AutoConfig.from_pretrained(str(source.folder))
    check_layout(source.spec(), lambda: meta_model(config))


def small_default_config(model_type):
    """The type's default config with few layers (the config class recomputes its per-layer lists)."""
    config = transformers.AutoConfig.for_model(model_type)
    for field in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(getattr(config, field, None), int):
            setattr(config, field, 6)
    for field in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(getattr(config, field, None), int) and getattr(config, field) > 8:
            setattr(config, field, 8)
    if getattr(config, "layer_types", None) is not None:
        try:
            config.layer_types = config.layer_types[:6]
        except AttributeError:  # Falcon-H1 derives its layer types and has no setter
            pass
    if model_type == "deepseek_v3":
        config.first_k_dense_replace = 2  # keeps both kinds of layer in six
    return config


@pytest.mark.parametrize("model_type", sorted(set(SUPPORTED_MODEL_TYPES) - LEGACY_TYPES))
def test_every_reader_matches_its_default_config(model_type):
    config = small_default_config(model_type)
    spec = spec_from_config({**config.to_dict(), "model_type": model_type}, model_type)
    assert spec.exactness == "exact"
    check_layout(spec, lambda: meta_model(config))


def test_falcon_kv_heads_match_the_attention_module():
    for name, expected in (("falcon-7b", 1), ("falcon-40b", 8), ("falcon2-11b", 8)):
        config = transformers.AutoConfig.from_pretrained(str(resolve_model(name).folder))
        attention = meta_model(config).transformer.h[0].self_attention
        assert attention.num_kv_heads == expected == resolve_model(name).spec().num_kv_heads


def test_fused_experts_stay_16_bit_under_transformers_5():
    config = transformers.AutoConfig.from_pretrained(str(resolve_model("mixtral-8x7b").folder))
    model = meta_model(config)
    experts = model.model.layers[0].mlp.experts
    assert not isinstance(experts, torch.nn.Linear) and experts.gate_up_proj.dim() == 3
    assert not any(name.startswith("model.layers.0.mlp.experts") for name in quantized_names(model))
    row_nf4 = resolve_model("mixtral-8x7b").spec()
    assert quantized_params(row_nf4, get_scheme("nf4")) < 0.05 * row_nf4.param_count
