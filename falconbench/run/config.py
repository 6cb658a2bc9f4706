"""What one measured configuration is: a model, a scheme and every knob, plus the hash that names it.

Pure Python (no torch): the parent process builds and validates configurations, the spawned worker receives
them as dicts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import RunError, UsageError
from ..placement import check_device_map
from ..planner import ATTN_IMPLS, DEVICES, check_positive
from ..results import settings_hash
from ..schemes import Scheme, get_scheme, kv_dtype_for  # noqa: F401 - kv_dtype_for is re-exported
from ..sources import ModelSource

RUN_DEVICES: tuple[str, ...] = ("auto",) + DEVICES
DEFAULT_INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (Dettmers et al. 2022, section 3.2)
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # torch.load files: loading them can run code
MAX_NAME_CHARS = 100  # of a folder name made from a model name (file systems allow 255 bytes per name)
# NOTE: bounds far past any real run, so a typo (an extra zero, 10^20) is refused before a worker starts rather
# than failing inside torch in every worker (C++ frames in the row, an OverflowError, exit 0)
MAX_RUN_VALUE = {"prompt_tokens": 2**20, "new_tokens": 2**20, "batch": 2**16, "repeats": 10_000, "warmup": 10_000}


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
    attn_impl: str = "sdpa"  # transformers' attn_implementation
    seed: int = 0
    # quality against the reference scheme (measured when `quality`; the same for every scheme of a sweep)
    quality: bool = False
    reference: str = "bf16"
    eval_text: str | None = None
    eval_tokens: int = 2048
    window: int = 1024
    stride: int = 512
    # what loading may do beyond reading safetensors from disk (all off unless the user asks)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    allow_downloads: bool = False
    memory_cap_bytes: int | None = None  # address space the worker may add after its imports (RLIMIT_AS)
    # how transformers splits the layers (None: all on `device`), with a budget per device ("0", "cpu")
    device_map: str | None = None
    max_memory: tuple[tuple[str, int], ...] = ()
    offload_folder: str | None = None  # where disk-mapped weights may be written (None: OUTPUT/offload)

    def __post_init__(self):
        get_scheme(self.dtype)
        check_device_map(self.device_map, dict(self.max_memory), self.device)
        if self.device_map and self.random_weights:
            raise UsageError("--device-map places the weights transformers' from_pretrained reads, and random "
                             "weights are built in place. Measure a model folder, or leave --device-map out")
        if self.device not in DEVICES:
            raise UsageError(f"device must be one of {', '.join(DEVICES)} once resolved, not {self.device!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise UsageError(f"unknown attention implementation {self.attn_impl!r}. "
                             f"Choose from: {', '.join(ATTN_IMPLS)}")
        for name in ("prompt_tokens", "new_tokens", "repeats", "batch"):
            check_positive(name, getattr(self, name))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise UsageError(f"warmup must be a whole number of runs (0 or more), got {self.warmup!r}")
        for name, most in MAX_RUN_VALUE.items():
            if getattr(self, name) > most:
                raise UsageError(f"{name.replace('_', '-')} is {getattr(self, name):,}, more than falconbench runs "
                                 f"(at most {most:,}). Lower --{name.replace('_', '-')}")
        if self.memory_cap_bytes is not None:
            check_positive("memory cap", self.memory_cap_bytes)
            if self.memory_cap_bytes > machine_memory_bytes():
                raise UsageError(f"--memory-cap of {self.memory_cap_bytes:,} bytes is more than this machine's "
                                 f"{machine_memory_bytes():,} bytes of memory, so it caps nothing. Give a smaller "
                                 "size, such as 4G, or leave it out")
        # NOTE: validated even when quality is off, so a mistyped --window or --stride is refused, not ignored
        self.quality_spec()
        if self.quality and self.eval_text is not None and not Path(self.eval_text).expanduser().is_file():
            raise UsageError(f"--eval-text {self.eval_text}: no such file. Pass a UTF-8 text file, or leave it out "
                             "to score the shipped text")
        if not isinstance(self.int8_threshold, (int, float)) or not 0 <= self.int8_threshold < math.inf:
            raise UsageError(f"int8 threshold must be a finite number, 0 or more, got {self.int8_threshold!r}. "
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

    def quality_spec(self):
        """The quality settings of this configuration (a QualitySpec; pure Python, no torch)."""
        from ..quality.spec import QualitySpec

        get_scheme(self.reference)
        # NOTE: an fp32 reference keeps its log-probabilities in float32; float16 storage would round away the
        # precision that made it the reference
        return QualitySpec(reference=self.reference, eval_text=Path(self.eval_text) if self.eval_text else None,
                           eval_tokens=self.eval_tokens, window=self.window, stride=self.stride, seed=self.seed,
                           logprob_dtype="float32" if self.reference == "fp32" else "float16")

    def settings(self) -> dict[str, Any]:
        """Every knob of this configuration, as recorded in its row and hashed into its config_hash."""
        scheme = self.scheme
        return {
            "device": self.device, "random_weights": self.random_weights, "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens, "cached_tokens": self.cached_tokens, "repeats": self.repeats,
            "warmup": self.warmup, "batch": self.batch, "seed": self.seed, "torch_dtype": scheme.torch_dtype,
            "kv_dtype": kv_dtype_for(scheme), "attn_impl": self.attn_impl,
            "quantization": quantization_settings(scheme, self.int8_threshold),
            "quality": self.quality_settings(), "trust_remote_code": self.trust_remote_code,
            "allow_pickle": self.allow_pickle, "memory_cap_bytes": self.memory_cap_bytes, **self.map_settings(),
        }

    def map_settings(self) -> dict[str, Any]:
        """The device map and its budgets, when there is one (absent otherwise, so earlier rows keep their hash)."""
        if not self.device_map:
            return {}
        return {"device_map": self.device_map, "max_memory": dict(self.max_memory)}

    def quality_settings(self) -> dict[str, Any] | None:
        """What the quality measurement is scored on (None when it is not measured)."""
        if not self.quality:
            return None
        spec = self.quality_spec()
        return {"reference": self.reference, "eval_text": spec.text_name(), "eval_tokens": self.eval_tokens,
                "window": self.window, "stride": self.stride}


def machine_memory_bytes() -> int:
    """The machine's physical memory (Linux and macOS: sysconf), the most a --memory-cap can mean."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: bounded by what an address space can hold
        return 2**63 - 1


def check_against_model(config: RunConfig, spec) -> None:
    """Refuse token counts the model cannot take: more cached positions than its position limit."""
    limit = spec.max_positions
    if limit and config.cached_tokens > limit:
        raise UsageError(f"--prompt-tokens {config.prompt_tokens} + --new-tokens {config.new_tokens} need "
                         f"{config.cached_tokens:,} positions; {spec.name} has {limit:,}. Lower them")


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


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a model folder, sorted: safetensors, and pickle-based ones only when allowed."""
    suffixes = WEIGHT_SUFFIXES + (PICKLE_SUFFIXES if allow_pickle else ())
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))


def check_safetensors(path: Path) -> None:
    """Refuse a half-written safetensors file before any process loads it: the header (an 8-byte length, then
    JSON naming each tensor's byte range) says how long the file must be."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(handle.read(length)) if 0 <= length <= min(size, 100 * 2**20) else None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON (UnicodeDecodeError is one too)
        raise RunError(f"{path} is not a readable safetensors file ({exc}). Download or convert it again") from None
    if not isinstance(header, dict):
        raise RunError(f"{path} is not a safetensors file, or its header is cut short ({size:,} bytes). Download "
                       "or convert it again")
    ends = [tensor_end(path, name, entry) for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise RunError(f"{path} is truncated: {size:,} of {expected:,} bytes. The download or copy did not "
                       "finish; fetch it again")


def tensor_end(path: Path, name: str, entry: Any) -> int:
    """Where a tensor's bytes end, from its safetensors header entry; a malformed entry is refused by name."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    whole = isinstance(offsets, list) and len(offsets) == 2 and all(
        isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    if not whole or offsets[0] > offsets[1]:
        raise RunError(f"{path} is not a valid safetensors file: tensor {name[:100]!r} has data_offsets "
                       f"{str(offsets)[:60]}, not two byte positions [begin, end]. Download or convert it again")
    return offsets[1]


def model_identity(source: ModelSource, random_weights: bool, allow_pickle: bool = False) -> dict[str, Any]:
    """What names the model for hashing: its config's contents and, for real weights, where they are and their
    sizes (the snapshot folder of a hub id is its commit)."""
    identity: dict[str, Any] = {"name": source.name, "kind": source.kind, "config_sha256": source.config_sha256}
    if random_weights:
        identity["weights"] = "random"
    else:
        identity["folder"] = str(source.folder.resolve())
        identity["weights"] = [[p.name, p.stat().st_size] for p in weight_files(source.folder, allow_pickle)]
        identity["weights_fingerprint"] = weights_fingerprint(source.folder, allow_pickle)
    return identity


FINGERPRINT_BLOCKS = 64  # blocks read per weight file
FINGERPRINT_BLOCK_BYTES = 64 * 2**10


def weights_fingerprint(folder: Path, allow_pickle: bool = False) -> str:
    """16 hex digits that tell one model's weights from another's without reading them whole: each weight
    file's name, size, first MiB (a safetensors header names every tensor) and 64 blocks of 64 KiB spread evenly
    over it. Two fine-tunes of one architecture differ in every block; a 14 GB model costs 4 MiB of reads."""
    digest = hashlib.sha256()
    for path in weight_files(Path(folder), allow_pickle):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(2**20))
            for index in range(FINGERPRINT_BLOCKS):
                handle.seek(size * index // FINGERPRINT_BLOCKS)
                digest.update(handle.read(FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()[:16]


def config_hash(identity: dict[str, Any], config: RunConfig) -> str:
    """A deterministic name for one configuration: model identity + dtype + every setting, as its row records
    them (so a reader can recompute it from the row)."""
    return settings_hash(config.dtype, {**config.settings(), "model_source": identity})


def require_weights(source: ModelSource, random_weights: bool, allow_pickle: bool = False) -> None:
    """Refuse a model without weights unless random weights were asked for, and pickle-based weights unless
    they were allowed (torch.load can run code hidden in the file)."""
    if random_weights:
        return
    if source.kind == "profile" or not source.folder.is_dir():
        raise RunError(f"{source.name}: no weights, only a config. Pass --random-weights to measure the "
                       "architecture with random weights, or point --model at a model folder")
    files = weight_files(source.folder, allow_pickle)
    if files:
        for path in files:
            if path.name.endswith(WEIGHT_SUFFIXES):
                check_safetensors(path)
        return
    pickled = weight_files(source.folder, allow_pickle=True)
    if pickled:
        raise RunError(f"{source.name}: {source.folder} holds only pickle-based weights ({pickled[0].name}), and "
                       "loading them can run code from the file. Convert them to safetensors, or pass "
                       "--allow-pickle if you trust where they came from")
    raise RunError(f"{source.name}: no safetensors weights in {source.folder}. Pass --random-weights to "
                   "measure the architecture with random weights, or point --model at a model folder")


def sanitize(name: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """A model name made safe as a folder name: `tiiuae/falcon-7b` → `tiiuae-falcon-7b`; never a path, never
    hidden, and short enough for the time stamp that follows it."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:max_chars].rstrip("-.")
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
