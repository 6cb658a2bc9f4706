"""Weight storage schemes: the closed vocabulary of dtypes and what each costs per weight.

The byte counts follow what bitsandbytes stores when transformers loads a model (bitsandbytes 0.4x-0.5x):
- LLM.int8 (`Linear8bitLt`): int8 weight, plus `SCB`, one fp32 scale per output row.
- 4-bit (`Linear4bit`, nf4/fp4): two weights per byte, plus one fp32 absmax per block of 64 weights and the
  16-entry fp32 codebook of the layer's `QuantState`.
- Double quantization quantizes those absmax values to uint8 in blocks of 256, with an fp32 absmax per block,
  a 256-entry fp32 dynamic codebook and one fp32 offset (QLoRA, Dettmers et al. 2023, section 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import UsageError, did_you_mean

Kind = Literal["float", "int8", "4bit"]

BLOCKSIZE_4BIT = 64  # bitsandbytes' default `bnb_4bit_blocksize` through transformers
BLOCKSIZE_NESTED = 256  # blocksize of the second quantization (bitsandbytes `quantize_blockwise`)
CODEBOOK_4BIT_ENTRIES = 16  # nf4/fp4 lookup table, fp32
CODEBOOK_NESTED_ENTRIES = 256  # dynamic 8-bit map of double quantization, fp32
FP32 = 4


@dataclass(frozen=True)
class Scheme:
    """How one configuration stores its weights: the linear layers' format, and the width of everything else."""

    name: str
    kind: Kind
    float_bytes: int  # bytes per element of parameters that stay floating point (embeddings, norms, biases, head)
    torch_dtype: str  # the dtype the model is loaded in (and computes in, for quantized layers)
    quant_type: str | None = None  # "nf4" / "fp4" for 4-bit
    double_quant: bool = False
    description: str = ""

    def __post_init__(self):
        if self.kind not in ("float", "int8", "4bit"):
            raise ValueError(f"scheme kind must be float, int8 or 4bit, not {self.kind!r}")
        if (self.kind == "4bit") != (self.quant_type is not None):
            raise ValueError("a 4-bit scheme needs quant_type, and only a 4-bit scheme has one")

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    def linear_weight_bytes(self, in_features: int, out_features: int) -> int:
        """Bytes of one linear layer's weight (bias excluded) as stored in this scheme."""
        n = in_features * out_features
        if self.kind == "float":
            return n * self.float_bytes
        if self.kind == "int8":
            return n + out_features * FP32  # int8 weight + SCB row scales
        packed = -(-n // 2)
        blocks = -(-n // BLOCKSIZE_4BIT)
        codebook = CODEBOOK_4BIT_ENTRIES * FP32
        if not self.double_quant:
            return packed + blocks * FP32 + codebook
        nested_blocks = -(-blocks // BLOCKSIZE_NESTED)
        nested = nested_blocks * FP32 + CODEBOOK_NESTED_ENTRIES * FP32 + FP32  # absmax2 + code2 + offset
        return packed + blocks + nested + codebook


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp32", "float", 4, "float32", description="32-bit float"),
        Scheme("bf16", "float", 2, "bfloat16", description="bfloat16, what Falcon was trained in"),
        Scheme("fp16", "float", 2, "float16", description="float16"),
        # NOTE: LLM.int8 computes in float16 (bitsandbytes casts activations to fp16), so the rest stays fp16.
        Scheme("int8", "int8", 2, "float16", description="bitsandbytes LLM.int8, fp16 compute"),
        Scheme("nf4", "4bit", 2, "bfloat16", quant_type="nf4", description="bitsandbytes NF4, bf16 compute"),
        Scheme("nf4-dq", "4bit", 2, "bfloat16", quant_type="nf4", double_quant=True,
               description="NF4 with double quantization, bf16 compute"),
        Scheme("fp4", "4bit", 2, "bfloat16", quant_type="fp4", description="bitsandbytes FP4, bf16 compute"),
    )
}

# The four precisions users compare, most precise first: what `run` and `fit` take when none is named.
DEFAULT_DTYPES: tuple[str, ...] = ("bf16", "fp16", "int8", "nf4")

# `--kv-dtype auto` (the default) is what transformers does: the cache takes the model's compute dtype (an fp32
# model caches in fp32, every other scheme in 16 bits), so `plan`, `fit` and `run` agree by default.
KV_DTYPE_AUTO = "auto"
KV_DTYPES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def get_scheme(name: str) -> Scheme:
    """The scheme called `name` (case-insensitive)."""
    scheme = SCHEMES.get(name.strip().lower())
    if scheme is None:
        raise UsageError(f"unknown dtype {name!r}.{did_you_mean(name, SCHEMES)} Choose from: {', '.join(SCHEMES)}")
    return scheme


def compute_bytes(scheme: Scheme) -> int:
    """Bytes per element of the scheme's compute dtype (activations, recurrent convolution states)."""
    return 4 if scheme.torch_dtype == "float32" else 2


def kv_dtype_for(scheme: Scheme, kv_dtype: str = KV_DTYPE_AUTO) -> str:
    """The KV cache dtype a configuration uses: `kv_dtype` as named, or for auto the scheme's compute dtype."""
    name = kv_dtype.strip().lower() if isinstance(kv_dtype, str) else kv_dtype
    if name == KV_DTYPE_AUTO:
        return _DTYPE_NAMES[scheme.torch_dtype]
    if name not in KV_DTYPES:
        raise UsageError(f"unknown KV cache dtype {kv_dtype!r}.{did_you_mean(str(kv_dtype), KV_DTYPES)} Choose from: "
                         f"{KV_DTYPE_AUTO}, {', '.join(KV_DTYPES)}")
    return name


def kv_dtype_bytes(name: str, scheme: Scheme | None = None) -> int:
    """Bytes per element of a KV cache dtype (auto follows `scheme`'s compute dtype, bf16 without one)."""
    return KV_DTYPES[kv_dtype_for(scheme or SCHEMES["bf16"], name)]
