"""The planned device-map split against the library's own: transformers' `_get_device_map` (what `from_pretrained`
calls with device_map="auto" and max_memory) on the model built on the meta device, for float and bitsandbytes
schemes, one GPU or several, CPU and disk."""

from __future__ import annotations

import json
import random

import pytest

from falconbench.errors import UsageError
from falconbench.placement import check_device_map, check_plan_budgets, device_label, plan_placement
from falconbench.planner import weights_bytes
from falconbench.schemes import get_scheme
from falconbench.sources import resolve_model
from tiny_models import TINY_FALCON, TINY_LLAMA, TINY_MIXTRAL, write_config

torch = pytest.importorskip("torch")

SMOLLM2_SHAPE = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "max_position_embeddings": 8192, "tie_word_embeddings": True}
# GPT-2: token and position embeddings as two modules, Conv1D projections; OPT: two embeddings and the
# project_out/project_in linears outside the layers, which bitsandbytes replaces too
TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 256, "n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 256}
TINY_OPT = {"model_type": "opt", "vocab_size": 256, "hidden_size": 128, "word_embed_proj_dim": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "ffn_dim": 256, "max_position_embeddings": 256,
            "do_layer_norm_before": False}
MODELS = {"llama": {**TINY_LLAMA, "num_hidden_layers": 6}, "falcon": {**TINY_FALCON, "num_hidden_layers": 5},
          "mixtral": {**TINY_MIXTRAL, "num_hidden_layers": 4}, "smollm2": SMOLLM2_SHAPE, "gpt2": TINY_GPT2,
          "opt": TINY_OPT}


def meta_model(config: dict, scheme_name: str):
    """The model as from_pretrained builds it before placing it: on meta, bitsandbytes layers swapped in, both
    under the scheme's dtype as torch's default (from_pretrained's `local_torch_dtype`: the biases of the linears
    bitsandbytes swaps in are created in it)."""
    from transformers.modeling_utils import local_torch_dtype

    with local_torch_dtype(getattr(torch, get_scheme(scheme_name).torch_dtype)):
        return _meta_model(config, scheme_name)


def _meta_model(config: dict, scheme_name: str):
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    fields = dict(config)
    scheme = get_scheme(scheme_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields),
                                                 dtype=getattr(torch, scheme.torch_dtype))
    if not scheme.quantized:
        return model, None
    # NOTE: fp32 CPU offload allowed only so that validate_environment lets the oracle answer for every budget;
    # it changes nothing in the sizes the split is computed from
    bnb = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True) if scheme.kind == "int8" else
           BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme.quant_type,
                              bnb_4bit_compute_dtype=getattr(torch, scheme.torch_dtype),
                              llm_int8_enable_fp32_cpu_offload=True))
    quantizer = AutoHfQuantizer.from_config(bnb, pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=getattr(torch, scheme.torch_dtype), device_map="auto",
                               checkpoint_files=None, use_kernels=False)
    return model, quantizer


def library_layers(config: dict, scheme: str, device_map: str, max_memory: dict[str, int]) -> dict[str, int]:
    """Decoder layers per device in the map transformers computes."""
    from transformers.integrations.accelerate import _get_device_map

    model, quantizer = meta_model(config, scheme)
    budgets = {int(k) if k.isdigit() else k: v for k, v in max_memory.items()}
    return layers_by_device(model, _get_device_map(model, device_map, budgets, quantizer))


def budgets(rng: random.Random, total: int) -> dict[str, int]:
    """Budgets around the model's size: up to three GPUs and the CPU, so every kind of split comes up."""
    scale = total * rng.choice([0.3, 0.6, 1.0, 1.5])
    chosen = {str(g): int(rng.random() * scale) for g in range(rng.randint(0, 3))}
    if not chosen or rng.random() < 0.7:
        chosen["cpu"] = int(rng.random() * scale)
    return chosen


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("scheme", ["bf16", "fp32", "nf4", "int8"])
def test_layers_per_device_are_the_libraries(tmp_path, name, scheme):
    config = MODELS[name]
    spec = resolve_model(str(write_config(tmp_path / name, config))).spec()
    rng = random.Random(f"{name}-{scheme}")
    splits = set()
    for _ in range(12):
        max_memory = budgets(rng, weights_bytes(spec, get_scheme("bf16" if scheme != "fp32" else "fp32")))
        device_map = rng.choice(["auto", "balanced", "sequential"])
        planned = plan_placement(spec, get_scheme(scheme), device_map, max_memory)
        assert {d: n for d, n in planned.layers.items() if n} == library_layers(config, scheme, device_map,
                                                                                 max_memory), (device_map, max_memory)
        splits.add(len([n for n in planned.layers.values() if n]))
    assert max(splits) > 1  # the budgets did split the layers


def test_offload_reserves_the_largest_module_still_to_place():
    """SmolLM2 at 120 MiB of CPU: the embeddings (54 MiB) are the largest module, but once they are placed the
    room kept back is one layer's, so 8 layers join them on the CPU and 22 go to disk (as from_pretrained does)."""
    spec = resolve_model("smollm2").spec()
    placement = plan_placement(spec, get_scheme("bf16"), "auto", {"cpu": 120 * 2**20})
    assert placement.layers == {"cpu": 8, "disk": 22}
    assert sum(placement.weights_bytes.values()) == weights_bytes(spec, get_scheme("bf16"))


def test_balanced_caps_all_gpus_but_the_last():
    spec = resolve_model("falcon-7b").spec()
    sequential = plan_placement(spec, get_scheme("bf16"), "sequential", {"0": 40 * 2**30, "1": 40 * 2**30})
    balanced = plan_placement(spec, get_scheme("bf16"), "balanced", {"0": 40 * 2**30, "1": 40 * 2**30})
    assert sequential.layers == {"gpu0": 32}
    assert balanced.layers == {"gpu0": 16, "gpu1": 16}


@pytest.mark.parametrize("device_map, max_memory, device, message", [
    (None, {"cpu": 1}, "cpu", "--max-memory is the budget of a device map"),
    ("auto", {"npu": 1}, "cuda", "use a GPU index"),
    ("auto", {"0": 1}, "cpu", "names GPU 0 but the device is cpu"),
    ("spread", {}, "cuda", "unknown device map 'spread'"),
])
def test_bad_device_maps_are_refused(device_map, max_memory, device, message):
    with pytest.raises(UsageError, match=message):
        check_device_map(device_map, max_memory, device)


def test_plan_needs_budgets():
    with pytest.raises(UsageError, match="needs --max-memory"):
        check_plan_budgets("auto", None, "cuda")


def test_placement_survives_json():
    spec = resolve_model("smollm2").spec()
    placement = plan_placement(spec, get_scheme("bf16"), "sequential", {"cpu": 120 * 2**20})
    assert json.loads(json.dumps(placement.as_dict()))["layers"] == {"cpu": 8, "disk": 22}


def layers_by_device(model, mapping) -> dict[str, int]:
    owners = sorted(mapping, key=len, reverse=True)
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if type(module).__name__ in model._no_split_modules:
            device = next(mapping[k] for k in owners if k == "" or name == k or name.startswith(k + "."))
            counts[device_label(device)] = counts.get(device_label(device), 0) + 1
    return counts


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sequential_split_is_accelerates_too(tmp_path, name):
    """accelerate's own `infer_auto_device_map` (tied model, the decoder layers unsplittable) agrees with
    transformers' copy on a sequential float split; their `get_balanced_memory` buffers differ, so `balanced` is
    checked against transformers only (the one `from_pretrained` calls)."""
    from accelerate import infer_auto_device_map

    config = MODELS[name]
    spec = resolve_model(str(write_config(tmp_path / name, config))).spec()
    rng = random.Random(name)
    for _ in range(8):
        max_memory = budgets(rng, weights_bytes(spec, get_scheme("bf16")))
        model, _ = meta_model(config, "bf16")
        model.tie_weights()
        mapping = infer_auto_device_map(model, {int(k) if k.isdigit() else k: v for k, v in max_memory.items()},
                                        no_split_module_classes=list(model._no_split_modules))
        planned = plan_placement(spec, get_scheme("bf16"), "sequential", max_memory)
        assert {d: n for d, n in planned.layers.items() if n} == layers_by_device(model, mapping), max_memory


@pytest.mark.parametrize("scheme", ["nf4", "int8", "bf16"])
def test_oracle_sizes_layers_as_a_real_load(tmp_path, scheme):
    """The oracle's decoder layer and projections weigh what the planner sizes them at (a layer of tiny OPT in
    nf4: bitsandbytes' swapped-in biases in bf16, as from_pretrained creates them, not float32)."""
    from transformers.integrations.accelerate import compute_module_sizes

    from falconbench.placement import model_modules

    spec = resolve_model(str(write_config(tmp_path / "opt", TINY_OPT))).spec()
    model, quantizer = meta_model(TINY_OPT, scheme)
    sizes, _ = compute_module_sizes(model, quantizer)
    planned = {m.name: m.size for root in model_modules(spec, get_scheme(scheme)) for m in root.walk()}
    assert planned["base.layers.0"] == sizes["model.decoder.layers.0"]
    assert planned["base.project_in"] == sizes["model.decoder.project_in"]
    assert planned["base.embed_1"] == sizes["model.decoder.embed_positions"]


@pytest.mark.parametrize("scheme", ["nf4", "int8", "bf16"])
def test_the_refused_splits_are_the_ones_transformers_refuses(tmp_path, scheme):
    """`load_refusal` (run's refusal, plan's and fit's note) against bitsandbytes' own `validate_environment`,
    given the map transformers computes and falconbench's quantization config (no fp32 CPU offload)."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.accelerate import _get_device_map
    from transformers.quantizers import AutoHfQuantizer

    config = MODELS["gpt2"]
    spec = resolve_model(str(write_config(tmp_path / "gpt2", config))).spec()
    rng = random.Random(f"refusal-{scheme}")
    model, quantizer = meta_model(config, scheme)
    strict = (AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_8bit=True) if scheme == "int8" else
                                          BitsAndBytesConfig(load_in_4bit=True), pre_quantized=False)
              if quantizer else None)
    outcomes = set()
    for _ in range(16):
        max_memory = budgets(rng, weights_bytes(spec, get_scheme("bf16")))
        planned = plan_placement(spec, get_scheme(scheme), "auto", max_memory)
        mapping = _get_device_map(model, "auto", {int(k) if k.isdigit() else k: v for k, v in max_memory.items()},
                                  quantizer)
        try:
            if strict:
                strict.validate_environment(device_map=mapping)
            refused = False
        except ValueError as error:
            assert "dispatched on the CPU or the disk" in str(error)
            refused = True
        assert (planned.refused is not None) == refused, (max_memory, planned.layers)
        outcomes.add(refused)
    assert outcomes == ({True, False} if strict else {False})


@pytest.mark.parametrize("device_map", ["auto", "sequential"])
@pytest.mark.parametrize("max_memory", [{"0": 0, "1": 20 * 2**20, "cpu": 40 * 2**20},
                                        {"0": 30 * 2**20, "1": 0, "2": 30 * 2**20, "cpu": 0}])
def test_a_zero_budget_leaves_a_device_out_as_transformers_does(tmp_path, device_map, max_memory):
    config = MODELS["smollm2"]
    spec = resolve_model(str(write_config(tmp_path / "smollm2", config))).spec()
    planned = plan_placement(spec, get_scheme("bf16"), device_map, max_memory)
    assert {d: n for d, n in planned.layers.items() if n} == library_layers(config, "bf16", device_map, max_memory)


def params_by_device(model, mapping) -> dict[str, int]:
    owners = sorted(mapping, key=len, reverse=True)
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        device = device_label(next(mapping[k] for k in owners if k == "" or name == k or name.startswith(k + ".")))
        counts[device] = counts.get(device, 0) + param.numel()
    return counts


@pytest.mark.parametrize("name", ["gpt2", "opt", "opt-prenorm", "smollm2"])
def test_parameters_per_device_are_the_libraries(tmp_path, name):
    """Every module outside the layers lands where transformers puts it: GPT-2's position embeddings beside or
    apart from its token embeddings, OPT's final LayerNorm (registered before its layers) on the first device."""
    from transformers.integrations.accelerate import _get_device_map

    config = {**TINY_OPT, "do_layer_norm_before": True} if name == "opt-prenorm" else MODELS[name]
    spec = resolve_model(str(write_config(tmp_path / name, config))).spec()
    model, _ = meta_model(config, "bf16")
    rng = random.Random(f"params-{name}")
    for _ in range(10):
        max_memory = budgets(rng, weights_bytes(spec, get_scheme("bf16")))
        device_map = rng.choice(["auto", "sequential"])
        planned = plan_placement(spec, get_scheme("bf16"), device_map, max_memory)
        mapping = _get_device_map(model, device_map, {int(k) if k.isdigit() else k: v for k, v in max_memory.items()},
                                  None)
        assert {d: n for d, n in planned.params.items() if n} == params_by_device(model, mapping), max_memory
