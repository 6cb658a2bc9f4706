"""The general path: any causal LM the installed transformers ships, laid out from its own modules on the meta device.

`layout_spec` builds the model from its config with no memory (`torch.device("meta")`) and reads it into an
ArchSpec (`layout_modules.py`: what transformers' own bitsandbytes integration replaces, fused experts, ties,
`_keep_in_fp32_modules_strict`, each layer's cache by `cache_utils.get_layer_types_and_kwargs`). This module,
torch-free, caches the result as JSON under falconbench's cache folder, keyed by the config's digest and the
transformers version, so the next plan of that config imports no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .libraries import installed_version
from .spec import ArchSpec, CacheLayout, Experts, LayerGroup, Linear, positive_int

LAYOUT_FORMAT = 2  # bump when the JSON shape or the derivation changes: older files are then ignored
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
                       "extra_linears": tuple(Linear(**lin) for lin in data["extra_linears"]),
                       "embedding_parts": tuple(data["embedding_parts"])})


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
    from .layout_modules import spec_from_model

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


