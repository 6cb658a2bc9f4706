"""Option parsing shared by the commands: comma lists that may also repeat."""

from __future__ import annotations

from typing import Iterable

from ..errors import UsageError


def split_list(values: Iterable[str]) -> list[str]:
    """`-d bf16,int8 -d nf4` → ["bf16", "int8", "nf4"], order kept, duplicates dropped."""
    items: list[str] = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if item and item not in items:
                items.append(item)
    return items


def int_list(name: str, values: Iterable[str]) -> list[int]:
    """Positive integers from comma lists; accepts 8k/32K style suffixes (k = 1024)."""
    out = []
    for item in split_list(values):
        text = item.lower().replace("_", "")
        scale = 1024 if text.endswith("k") else 1
        try:
            number = int(text[:-1] if scale > 1 else text) * scale
        except ValueError:
            raise UsageError(f"{name} must be a positive integer, got {item!r}. Example: --{name} 2048,8k") from None
        if number <= 0:
            raise UsageError(f"{name} must be a positive integer, got {item!r}. Example: --{name} 2048,8k")
        if number not in out:
            out.append(number)
    return out
