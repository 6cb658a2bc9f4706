"""The planner's parameter count and bytes against the real module layout of transformers, on the meta device."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from falconbench import get_scheme, resolve_model, weights_bytes  # noqa: E402
from falconbench.schemes import SCHEMES  # noqa: E402
from falconbench.sources import model_profiles  # noqa: E402

# The output head stays 16-bit: transformers keeps it out of bitsandbytes' conversion.
HEAD_NAMES = {"lm_head", "embed_out"}


def meta_model(name):
    config = transformers.AutoConfig.from_pretrained(str(resolve_model(name).folder))
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # not applied for you under init_empty_weights: the head would count twice
    return model


def layout_bytes(model, scheme):
    """Bytes counted from the modules themselves: quantizable nn.Linear weights in the scheme's format."""
    total, seen = 0, set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            is_linear_weight = (isinstance(module, torch.nn.Linear) and param_name == "weight"
                                and module_name.split(".")[-1] not in HEAD_NAMES)
            if is_linear_weight:
                total += scheme.linear_weight_bytes(module.in_features, module.out_features)
            else:
                total += param.numel() * scheme.float_bytes
    return total


@pytest.mark.parametrize("name", model_profiles())
def test_planner_matches_the_real_layout(name):
    model = meta_model(name)
    spec = resolve_model(name).spec()
    assert spec.param_count == sum(p.numel() for p in model.parameters())
    linears = [m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in HEAD_NAMES]
    assert len(linears) == spec.num_layers * len(spec.layer_linears)
    for scheme in SCHEMES.values():
        assert weights_bytes(spec, scheme) == layout_bytes(model, scheme), scheme.name


def test_falcon_kv_heads_match_the_attention_module():
    for name, expected in (("falcon-7b", 1), ("falcon-40b", 8)):
        attention = meta_model(name).transformer.h[0].self_attention
        assert attention.num_kv_heads == expected == resolve_model(name).spec().num_kv_heads


def test_tied_head_counts_once():
    spec = resolve_model("falcon-7b").spec()
    assert spec.tied_embeddings
    assert weights_bytes(spec, get_scheme("bf16")) == 2 * sum(p.numel() for p in meta_model("falcon-7b").parameters())
