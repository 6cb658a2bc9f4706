"""The reference scheme's numbers, stored once per run folder so isolated processes compare against the same data.

One safetensors file per (model, text, settings): `reference-<key>.safetensors` holding the token ids, the full
log-softmax at every scored position, the log-probability and argmax of each next token (in float32, so perplexity
and top-1 do not suffer the storage rounding), the greedy prompt and the reference's greedy continuation.

NOTE: the full distributions are stored in float16 by default. A bf16 reference's logits carry 8 significant bits;
float16 keeps 11, so storing adds less error than the reference already has, at half the bytes of float32. Choose
float32 (QualitySpec.logprob_dtype) for an fp32 reference. Size: (eval tokens − 1) × vocabulary × 2 bytes, e.g.
2047 × 65024 × 2 = 266 MB for Falcon at the default 2048 tokens; spec.MAX_REFERENCE_BYTES bounds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RunError, UsageError
from .spec import MAX_REFERENCE_BYTES, EvalTokens, QualitySpec

FORMAT_VERSION = 1
BYTES_PER_ELEMENT = {"float16": 2, "float32": 4}


def reference_key(spec: QualitySpec, model_id: str, text_sha256: str) -> str:
    """16 hex digits naming the reference of this model, text and settings."""
    identity = {"format": FORMAT_VERSION, "model": model_id, "text_sha256": text_sha256, **spec.stored_settings()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def reference_path(out_dir: Path, spec: QualitySpec, model_id: str, tokens: EvalTokens) -> Path:
    return Path(out_dir) / f"reference-{reference_key(spec, model_id, tokens.text_sha256)}.safetensors"


def check_reference_size(rows: int, vocab: int, dtype: str) -> None:
    """Refuse a reference that would exceed MAX_REFERENCE_BYTES, before any work is done."""
    size = rows * vocab * BYTES_PER_ELEMENT[dtype]
    if size > MAX_REFERENCE_BYTES:
        most = MAX_REFERENCE_BYTES // (vocab * BYTES_PER_ELEMENT[dtype]) + 1
        raise UsageError(f"the reference log-probabilities would take {size / 2**30:.1f} GiB ({rows} positions × "
                         f"{vocab} vocabulary × {dtype}). Lower --eval-tokens to {most} or less")


@dataclass(frozen=True, eq=False)
class StoredReference:
    """A reference file, read: small tensors in memory, the full log-probabilities read row range by row range."""

    path: Path
    token_ids: tuple[int, ...]
    target_logprobs: Any  # torch.Tensor float32 [rows]
    top1: Any  # torch.Tensor int64 [rows]
    greedy_tokens: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def logprob_rows(self, start: int, stop: int):
        """Rows [start, stop) of the stored log-softmax, as a CPU tensor of the stored dtype."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_slice("logprobs")[start:stop]


def write_reference(path: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write the file under a temporary name and rename it, so a killed run never leaves a half reference."""
    from safetensors.torch import save_file

    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp),
                  metadata={"falconbench": json.dumps(meta, sort_keys=True)})
        os.replace(temp, path)
    except OSError as exc:
        raise RunError(f"cannot write the reference {path}: {exc.strerror or exc}. Free some space or choose "
                       "another --output folder") from None
    finally:
        temp.unlink(missing_ok=True)


def read_reference(path: Path, reference: str) -> StoredReference:
    """Read a reference file; a missing or damaged one raises RunError saying how to produce it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise RunError(f"no stored {reference} reference ({path.name}) in {path.parent}. Measure the reference "
                       f"scheme ({reference}) first, with the same model, text and quality settings, into the same "
                       "output folder")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["falconbench"])
            small = {name: handle.get_tensor(name) for name in ("token_ids", "target_logprobs", "top1", "greedy")}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise RunError(f"the reference file {path} is unreadable ({exc}). Delete it and measure the reference "
                       "scheme again") from None
    return StoredReference(path, tuple(small["token_ids"].tolist()), small["target_logprobs"], small["top1"],
                           tuple(small["greedy"].tolist()), meta)
