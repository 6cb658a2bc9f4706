"""What the installed libraries do that the plan depends on, read from package metadata (no import of torch)."""

from __future__ import annotations

from functools import lru_cache

# Planned as if this transformers major version is installed when none is: the current one.
ASSUMED_TRANSFORMERS_MAJOR = 5


@lru_cache(maxsize=None)
def installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version  # 20 ms: only when a plan needs it

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def transformers_major() -> int:
    text = installed_version("transformers")
    try:
        return int(text.split(".")[0]) if text else ASSUMED_TRANSFORMERS_MAJOR
    except ValueError:
        return ASSUMED_TRANSFORMERS_MAJOR


def experts_quantized(fused_since_v4: bool) -> bool:
    """Whether bitsandbytes quantizes a MoE block's routed experts when transformers loads the model.

    transformers 5 fuses experts into 3-D parameters, and bitsandbytes (≤ 0.50) replaces only `nn.Linear`
    (bitsandbytes issue #1849, open): they stay 16-bit. transformers 4 built one `nn.Linear` per expert, except for
    families that were fused from their first release (gpt-oss).
    """
    return not fused_since_v4 and transformers_major() < 5
