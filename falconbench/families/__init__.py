"""Hand-written, torch-free readers of config.json, one per family, following transformers' modeling code.

Each reader returns an `ArchSpec` whose parameter count and bytes equal the module tree the installed transformers
builds (checked on the meta device in tests/test_families.py). `READERS` maps a config's `model_type` to its reader.
"""

from __future__ import annotations

from typing import Callable

from ..spec import ArchSpec, Fields, with_warnings
from . import classic, decoders, moe, ssm

Reader = Callable[[Fields, str, str], ArchSpec]

READERS: dict[str, Reader] = {**classic.READERS, **decoders.READERS, **moe.READERS, **ssm.READERS}
SUPPORTED_MODEL_TYPES = tuple(sorted(READERS))


def llama_shaped_estimate(fields: Fields, name: str, model_type: str) -> ArchSpec:
    """An unknown type with the standard fields, planned as a Llama-style decoder and labelled an estimate."""
    spec = decoders.llama(fields, name, model_type or "unknown")
    from ..layout import torch_available

    hint = ("The installed transformers does not know this type either (a model with remote code?)"
            if torch_available() else "Install torch and transformers (pip install 'falconbench[run]') to lay it "
            "out exactly from transformers' own modules")
    warning = (f"model_type {model_type or '(none)'!r} has no falconbench reader: weights and KV cache are an "
               f"ESTIMATE (a Llama-shaped decoder). {hint}")
    return with_warnings(spec.__class__(**{**spec.__dict__, "exactness": "estimate",
                                           "origin": "Llama-shaped estimate"}), warning)
