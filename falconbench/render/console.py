"""The Console, byte and time formatting, and the machine-readable formats shared by every command."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console

FORMATS: tuple[str, ...] = ("table", "json", "csv", "markdown")

_console: Console | None = None
_err_console: Console | None = None


# NOTE: rich lays out for 80 columns when stdout is a pipe or a file, which cuts the wide tables to "Dt…"; a
# log or `| tee` wants whole cells, so without a terminal (and without COLUMNS) the tables get this width.
PIPE_WIDTH = 200


def console() -> Console:
    """The stdout Console. Width and colour follow COLUMNS and NO_COLOR, so tests can pin them."""
    global _console
    if _console is None:
        _console = Console(highlight=False, soft_wrap=False, width=_pipe_width())
    return _console


def _pipe_width() -> int | None:
    """PIPE_WIDTH when stdout is not a terminal and COLUMNS is unset; None lets rich measure the terminal."""
    if os.environ.get("COLUMNS") or (sys.stdout is not None and sys.stdout.isatty()):
        return None
    return PIPE_WIDTH


def err_console() -> Console:
    """The stderr Console, for progress and warnings, so stdout stays clean for --format json."""
    global _err_console
    if _err_console is None:
        _err_console = Console(stderr=True, highlight=False)
    return _err_console


def reset_consoles() -> None:
    """Forget the Consoles (tests that change COLUMNS or capture output call this)."""
    global _console, _err_console
    _console = _err_console = None


def format_bytes(n: int | float | None) -> str:
    """Binary units, exact where the value is a whole number of them: 16 MiB, 1 GiB, 3.05 GiB."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size, digits in (("GiB", 2**30, 2), ("MiB", 2**20, 1), ("KiB", 2**10, 1)):
        if n >= size:
            value = n / size
            text = f"{value:,.0f}" if value == int(value) else f"{value:,.{digits}f}"
            return f"{sign}{text} {unit}"
    return f"{sign}{int(n)} B"


def format_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.2f} s"


def format_number(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or "-" where nothing was measured."""
    return "-" if value is None else format(value, spec)


def format_percent(x: float | None, signed: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def to_json(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(rows), indent=2, default=str)


def to_csv(rows: Sequence[dict[str, Any]], columns: Iterable[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, (list, tuple))
                         else json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in row.items()})
    return buffer.getvalue()


def to_markdown(headers: Sequence[str], body: Sequence[Sequence[str]], align_right: Sequence[bool] = ()) -> str:
    """A GitHub-flavoured Markdown table."""
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    rule = ["---:" if (i < len(align_right) and align_right[i]) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(map(esc, headers)) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines) + "\n"


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def versus_plan(measured: int | None, planned: int | None) -> str:
    """How far a measurement lies from the plan: "exact", a signed percentage of the plan, or the difference in
    bytes when a percentage would round it to zero."""
    if measured is None or not planned:
        return "-"
    difference = measured - planned
    if difference == 0:
        return "exact"
    if abs(difference) / planned >= 0.0005:
        return format_percent(difference / planned)
    return ("+" if difference > 0 else "") + format_bytes(difference)
