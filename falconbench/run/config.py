"""What one measured configuration is: a model, a scheme and every knob, plus the hash that names it.

Pure Python (no torch): the parent process builds and validates configurations, the spawned worker receives
them as dicts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import RunError, UsageError
from ..planner import DEVICES, check_positive
from ..schemes import Scheme, get_scheme
from ..sources import ModelSource

RUN_DEVICES: tuple[str, ...] = ("auto",) + DEVICES
DEFAULT_INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (Dettmers et al. 2022, section 3.2)
WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class RunConfig:
    """One configuration: `model` loaded in scheme `dtype` on `device`, then prefill + fixed-length decode."""

    model: str
    dtype: str
    device: str = "cpu"  # resolved: "cuda" or "cpu"
    random_weights: bool = False
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    batch: int = 1
    int8_threshold: float = DEFAULT_INT8_THRESHOLD
    seed: int = 0

    def __post_init__(self):
        get_scheme(self.dtype)
        if self.device not in DEVICES:
            raise UsageError(f"device must be one of {', '.join(DEVICES)} once resolved, not {self.device!r}")
        for name in ("prompt_tokens", "new_tokens", "repeats", "batch"):
            check_positive(name, getattr(self, name))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise UsageError(f"warmup must be a whole number of runs (0 or more), got {self.warmup!r}")
        if not isinstance(self.int8_threshold, (int, float)) or self.int8_threshold < 0:
            raise UsageError(f"int8 threshold must be 0 or more, got {self.int8_threshold!r}. "
                             f"LLM.int8's default is {DEFAULT_INT8_THRESHOLD}")

    @property
    def scheme(self) -> Scheme:
        return get_scheme(self.dtype)

    @property
    def cached_tokens(self) -> int:
        """Tokens the KV cache holds after the run: the prompt, plus every generated token but the last.

        NOTE: the last token is produced by the final forward and never fed back (as in `generate`), so a run
        of P prompt and N new tokens caches P + N - 1; the plan is made for exactly that many, so the KV error
        shown is the planner's and not an off-by-one of the loop.
        """
        return self.prompt_tokens + self.new_tokens - 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def settings(self) -> dict[str, Any]:
        """Every knob of this configuration, as recorded in its row and hashed into its config_hash."""
        scheme = self.scheme
        return {
            "device": self.device, "random_weights": self.random_weights, "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens, "cached_tokens": self.cached_tokens, "repeats": self.repeats,
            "warmup": self.warmup, "batch": self.batch, "seed": self.seed, "torch_dtype": scheme.torch_dtype,
            "kv_dtype": kv_dtype_for(scheme), "quantization": quantization_settings(scheme, self.int8_threshold),
        }


def kv_dtype_for(scheme: Scheme) -> str:
    """The cache takes the model's activation dtype: fp32 models cache in fp32, everything else in 16 bits."""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[scheme.torch_dtype]


def quantization_settings(scheme: Scheme, int8_threshold: float) -> dict[str, Any] | None:
    """The explicit BitsAndBytesConfig arguments of `scheme` (None for a float scheme).

    NOTE: bitsandbytes' own defaults are fp4 with fp32 compute; every field is spelled out so a row says
    exactly what ran.
    """
    if scheme.kind == "float":
        return None
    if scheme.kind == "int8":
        return {"load_in_8bit": True, "llm_int8_threshold": float(int8_threshold),
                "llm_int8_has_fp16_weight": False}
    return {"load_in_4bit": True, "bnb_4bit_quant_type": scheme.quant_type,
            "bnb_4bit_compute_dtype": scheme.torch_dtype, "bnb_4bit_use_double_quant": scheme.double_quant,
            "bnb_4bit_quant_storage": "uint8"}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def model_identity(source: ModelSource, random_weights: bool) -> dict[str, Any]:
    """What names the model for hashing: its config's contents and, for real weights, where they are and their
    sizes (the snapshot folder of a hub id is its commit)."""
    config_text = json.dumps(source.config, sort_keys=True)
    identity: dict[str, Any] = {"name": source.name, "kind": source.kind,
                                "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()}
    if random_weights:
        identity["weights"] = "random"
    else:
        identity["folder"] = str(source.folder.resolve())
        identity["weights"] = [[p.name, p.stat().st_size] for p in weight_files(source.folder)]
    return identity


def config_hash(identity: dict[str, Any], config: RunConfig) -> str:
    """A deterministic name for one configuration: model identity + dtype + every setting."""
    payload = {"model": identity, "dtype": config.dtype, "settings": config.settings()}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def require_weights(source: ModelSource, random_weights: bool) -> None:
    """Refuse a model without weights unless random weights were asked for."""
    if random_weights:
        return
    if source.kind == "profile" or not source.folder.is_dir() or not weight_files(source.folder):
        raise RunError(f"{source.name}: no safetensors weights in {source.folder}. Pass --random-weights to "
                       "measure the architecture with random weights, or point --model at a model folder")


def sanitize(name: str) -> str:
    """A model name made safe as a folder name: `tiiuae/falcon-7b` → `tiiuae-falcon-7b`."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return text or "model"


def default_output_dir(model_name: str, now: datetime | None = None, root: Path = Path("reports")) -> Path:
    """A new folder under reports/ named from the model and the time; never an existing one."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = root / f"{sanitize(model_name)}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
