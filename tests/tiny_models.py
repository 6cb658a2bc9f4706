"""Tiny Falcon (multi-query) and Llama (grouped-query) models for tests: config.json folders, with or without
random safetensors weights.

Sized for bitsandbytes' CPU 4-bit kernel: every linear layer's output features are a multiple of 32
(head_dim 32, so Falcon's fused QKV has 128 + 2 × 32 = 192 outputs and Llama's K/V projections 2 × 32 = 64).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_FALCON: dict[str, Any] = {
    "model_type": "falcon", "architectures": ["FalconForCausalLM"], "vocab_size": 256, "hidden_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "new_decoder_architecture": False, "multi_query": True,
    "parallel_attn": True, "bias": False, "ffn_hidden_size": 512, "max_position_embeddings": 256,
    "tie_word_embeddings": True, "initializer_range": 0.02,
}

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "tie_word_embeddings": False, "initializer_range": 0.02,
}


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    """A model folder holding only config.json (enough for --random-weights and the planner)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def save_tiny_model(folder: Path, config: dict[str, Any], dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A model folder with config.json and random safetensors weights, saved by transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    fields = dict(config)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder

TINY_MIXTRAL: dict[str, Any] = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 256, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
