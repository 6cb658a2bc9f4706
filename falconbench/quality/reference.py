"""The reference scheme's numbers, stored once per run folder so isolated processes compare against the same data.

One safetensors file per (model, text, settings): `reference-<key>.safetensors` holding the token ids, the full
log-softmax at every scored position, the log-probability and argmax of each next token (in float32, so perplexity
and top-1 do not suffer the storage rounding), the greedy prompt and the reference's greedy continuation.

Each file is vouched for by a sidecar `reference-<key>.sha256.json` holding its SHA-256, written after the file is
in place; the file's own metadata records the reference scheme, the model's weights fingerprint and the token hash.
Every reuse checks all of them (verify_reference), so a damaged file, one left by another model, or one whose write
never finished is rebuilt by the reference scheme, never read. The reference scheme always recomputes its file.

NOTE: the full distributions are stored in float16 by default. A bf16 reference's logits carry 8 significant bits;
float16 keeps 11, so storing adds less error than the reference already has, at half the bytes of float32. Choose
float32 (QualitySpec.logprob_dtype) for an fp32 reference. Size: (eval tokens − 1) × vocabulary × 2 bytes, e.g.
2047 × 65024 × 2 = 266 MB for Falcon at the default 2048 tokens; spec.MAX_REFERENCE_BYTES bounds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import RunError, UsageError
from ..results import write_atomic
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


def checksum_path(path: Path) -> Path:
    """The sidecar that vouches for a reference file."""
    return path.with_name(path.name.removesuffix(".safetensors") + ".sha256.json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_reference(path: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write the file under a temporary name, rename it, then write its checksum: a killed or failed write leaves
    either nothing or a file without a valid checksum, which no reader trusts."""
    from safetensors.torch import save_file

    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checksum_path(path).unlink(missing_ok=True)  # the old file's checksum must not outlive it
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp),
                  metadata={"falconbench": json.dumps(meta, sort_keys=True)})
        sha256 = file_sha256(temp)
        os.replace(temp, path)
        write_atomic(checksum_path(path), json.dumps({"file": path.name, "sha256": sha256}).encode())
    except OSError as exc:
        raise RunError(f"cannot write the reference {path}: {exc.strerror or exc}. Free some space or choose "
                       "another --output folder") from None
    finally:
        temp.unlink(missing_ok=True)


def stored_meta(path: Path) -> dict[str, Any]:
    """The falconbench metadata of a safetensors file, read from its header alone (no torch)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= 100 * 2**20:
            raise ValueError(f"header length {length}")
        header = json.loads(handle.read(length))
    meta = json.loads(header["__metadata__"]["falconbench"])
    if not isinstance(meta, dict):
        raise ValueError("metadata is not an object")
    return meta


def verify_reference(path: Path, expected: Mapping[str, Any]) -> str | None:
    """Why the reference file at `path` must not be used, or None when it checks out: it is a regular file,
    its SHA-256 is the one its checksum recorded, and its metadata has each of `expected`'s values (the reference
    scheme, the weights fingerprint, the token hash...)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return "it is not a regular file"
        recorded = json.loads(checksum_path(path).read_text(encoding="utf-8"))
        if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
            return f"its checksum file {checksum_path(path).name} is malformed"
        if file_sha256(path) != recorded["sha256"]:
            return "its SHA-256 differs from the one recorded when it was written (the file was changed or damaged)"
        meta = stored_meta(path)
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing (the write did not finish?)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        return f"it is unreadable ({type(exc).__name__}: {exc})"
    for key, value in expected.items():
        if meta.get(key) != value:
            return f"its {key} is {meta.get(key)!r}, this run's is {value!r}"
    return None


def read_reference(path: Path, reference: str, expected: Mapping[str, Any] | None = None) -> StoredReference:
    """Read a reference file after verify_reference; a missing, damaged or foreign one raises RunError saying how
    to produce it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise RunError(f"no stored {reference} reference ({path.name}) in {path.parent}. Measure the reference "
                       f"scheme ({reference}) first, with the same model, text and quality settings, into the same "
                       "output folder")
    problem = verify_reference(path, {"reference": reference, **(expected or {})})
    if problem:
        raise RunError(f"the stored reference {path} cannot be used: {problem}. Run the reference scheme "
                       f"({reference}) again into this folder: --resume reruns it")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["falconbench"])
            small = {name: handle.get_tensor(name) for name in ("token_ids", "target_logprobs", "top1", "greedy")}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise RunError(f"the reference file {path} is unreadable ({exc}). Delete it and measure the reference "
                       "scheme again") from None
    return StoredReference(path, tuple(small["token_ids"].tolist()), small["target_logprobs"], small["top1"],
                           tuple(small["greedy"].tolist()), meta)
