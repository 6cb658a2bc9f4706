"""The Console, byte and time formatting, and the machine-readable formats shared by every command."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from rich.box import HEAVY_HEAD, Box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

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


# --- Tables that fit the terminal -------------------------------------------------------------------------------
# NOTE: rich shrinks a table that is too wide by wrapping its cells, which splits numbers and names ("121.6" /
# "0 GiB"). A Grid never lets it: every column is no_wrap, and when the table is wider than the console, columns
# retreat until it fits: a column with one value in every row moves into a line above the table ("hoist"), then
# by priority "fold" columns move onto further lines of the first column and "drop" columns are left out (and
# named under the table), and "note" columns move under the table as one line per row that has a value;
# what still does not fit continues in a second table that repeats the key column.
# Titles and captions are printed as text of their own, wrapped at word boundaries at the console's width.


@dataclass(frozen=True)
class Col:
    """A column of a Grid: `priority` 0 never folds or drops; higher ones retreat first."""

    header: str
    right: bool = False
    priority: int = 0
    retreat: str = "fold"  # "fold" | "drop" | "note"
    hoist: bool = False  # when every row holds the same value, it may move into a line above the table
    ident: bool = False  # names the row in the lines of a "note" column
    wrap: bool = False  # prose: may wrap between words (never inside one)
    style: str | None = None


@dataclass(frozen=True)
class Layout:
    inline: tuple[int, ...]
    folded: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    hoisted: tuple[int, ...] = ()
    noted: tuple[int, ...] = ()


class Grid:
    """A table that lays itself out for the width it is given (a rich renderable)."""

    def __init__(self, columns: Sequence[Col], rows: Sequence[Sequence[str]], title: str = "", caption: str = "",
                 box: Box = HEAVY_HEAD, show_lines: bool = False, show_edge: bool = True,
                 row_styles: Sequence[str | None] = (), markup: bool = False, collapse_padding: bool = False):
        self.columns, self.rows = list(columns), [list(r) for r in rows]
        self.title, self.caption, self.markup = title, caption, markup
        self.box, self.show_lines, self.show_edge = box, show_lines, show_edge
        self.collapse_padding = collapse_padding
        self.row_styles = list(row_styles)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        layout = self.layout(console, options, width)
        if self.title:
            yield self._text(self.title)
        if layout.hoisted:
            yield self._text(" · ".join(f"{self.columns[i].header}: {self.rows[0][i]}" for i in layout.hoisted))
        yield from self._tables(layout, console, options, width)
        for i in layout.noted:
            yield from (self._text(line) for line in self._notes(layout, i))
        caption = self.caption
        if layout.dropped:
            names = ", ".join(self.columns[i].header.replace("\n", " ") for i in layout.dropped)
            caption += ("\n" if caption else "") + (f"Not shown at {width} columns: {names} (a wider terminal, or "
                                                     "--format markdown or json, shows every column).")
        if caption:
            yield self._text(caption)

    def _text(self, text: str) -> Text:
        return Text.from_markup(text) if self.markup else Text(text)

    def retreats(self) -> list[tuple[int, str]]:
        """The order in which columns leave the table's line: constant hoistable ones, then by priority."""
        constant = [(i, "hoist") for i, c in enumerate(self.columns)
                    if c.hoist and len(self.rows) > 1 and len({r[i] for r in self.rows}) == 1]
        ranked = sorted((i for i, c in enumerate(self.columns) if c.priority > 0 and (i, "hoist") not in constant),
                        key=lambda i: (-self.columns[i].priority, -i))
        return constant + [(i, self.columns[i].retreat) for i in ranked]

    def layout(self, console: Console, options: ConsoleOptions, width: int) -> Layout:
        """The first layout, retreating one column at a time, whose table fits `width`."""
        layout = Layout(tuple(range(len(self.columns))))
        for index, how in self.retreats():
            if self._fits(self._table(layout), console, options, width):
                break
            inline = tuple(i for i in layout.inline if i != index)
            if not inline:
                break
            if how == "fold" and index == layout.inline[0]:
                how = "drop"
            layout = Layout(inline, layout.folded + ((index,) if how == "fold" else ()),
                            layout.dropped + ((index,) if how == "drop" else ()),
                            layout.hoisted + ((index,) if how == "hoist" else ()),
                            layout.noted + ((index,) if how == "note" else ()))
        return layout

    def _notes(self, layout: Layout, index: int) -> list[str]:
        """A "note" column's values, one line per row that has one, named by the row's ident cells."""
        names = [i for i, c in enumerate(self.columns) if c.ident and i not in layout.hoisted]
        lines = [f"  {' '.join(row[i] for i in names)}: {row[index]}" if names else f"  {row[index]}"
                 for row in self.rows if row[index].strip()]
        return [f"{self.columns[index].header}:"] + lines if lines else []

    def _tables(self, layout: Layout, console: Console, options: ConsoleOptions, width: int) -> list:
        """One table, or the inline columns spread over several that each repeat the first; rows of
        `Header: value` lines where not even that fits."""
        table = self._table(layout)
        if self._fits(table, console, options, width):
            return [table]
        key, rest = layout.inline[:1], layout.inline[1:]
        chunks: list[list[int]] = [[]]
        for index in rest:
            trial = Layout(key + tuple(chunks[-1]) + (index,), layout.folded if len(chunks) == 1 else ())
            if chunks[-1] and not self._fits(self._table(trial), console, options, width):
                chunks.append([])
            chunks[-1].append(index)
        tables = [self._table(Layout(key + tuple(c), layout.folded if n == 0 else ())) for n, c in enumerate(chunks)]
        if all(self._fits(t, console, options, width) for t in tables):
            return tables
        return [self._records(layout.inline + layout.folded + layout.dropped + layout.noted)]

    def _fits(self, table: Table, console: Console, options: ConsoleOptions, width: int) -> bool:
        """Whether `table` fits with no_wrap columns whole and prose columns narrowed to their longest word."""
        natural = Measurement.get(console, options.update_width(10**6), table).maximum
        slack = 0
        for column in table.columns:
            if column.no_wrap:
                continue
            texts = [str(column.header)] + [c.plain if isinstance(c, Text) else str(c) for c in column.cells]
            longest_word = max((cell_len(w) for t in texts for w in t.split()), default=0)
            slack += max(cell_width(t) for t in texts) - longest_word
        return natural - slack <= width

    def _table(self, layout: Layout) -> Table:
        table = Table(box=self.box, show_lines=self.show_lines, show_edge=self.show_edge,
                      collapse_padding=self.collapse_padding)
        width = (lambda text: cell_width(text, self.markup))
        host = layout.inline[0]
        limit = max([width(r[host]) for r in self.rows] + [width(self.columns[host].header)]
                    + [width(r[j]) for r in self.rows for j in layout.folded])
        for i in layout.inline:
            col = self.columns[i]
            header = col.header
            if i == layout.inline[0] and layout.folded:
                header += "\n" + pack([self.columns[j].header.replace("\n", " ") for j in layout.folded], limit,
                                      self.markup)
            table.add_column(header, justify="right" if col.right and i != layout.inline[0] else "left",
                             no_wrap=not col.wrap, overflow="fold" if col.wrap else "ellipsis", style=col.style)
        for r, row in enumerate(self.rows):
            cells = [row[i] for i in layout.inline]
            if layout.folded and cells:
                cells[0] += "\n" + pack([row[j].replace("\n", " ") for j in layout.folded], limit, self.markup)
            table.add_row(*(cells if self.markup else [Text(c) for c in cells]),
                          style=self.row_styles[r] if r < len(self.row_styles) else None)
        return table

    def _records(self, order: Sequence[int]) -> Text:
        """Each row as `Header: value` lines, for widths no table fits in."""
        lines = []
        for row in self.rows:
            for n, i in enumerate(order):
                value = row[i].replace("\n", "; ")
                lines.append(f"{'' if n == 0 else '  '}{self.columns[i].header.replace(chr(10), ' ')}: {value}")
        return self._text("\n".join(lines))


def cell_width(text: str, markup: bool = False) -> int:
    """The widest line of `text` in terminal cells (with `markup`, as shown)."""
    return max((cell_len(Text.from_markup(line).plain if markup else line) for line in text.split("\n")), default=0)


def pack(values: Sequence[str], limit: int, markup: bool = False, separator: str = " · ") -> str:
    """`values` joined on lines of at most `limit` cells, breaking only between values."""
    lines: list[str] = []
    for value in values:
        if lines and cell_width(lines[-1] + separator + value, markup) <= limit:
            lines[-1] += separator + value
        else:
            lines.append(value)
    return "\n".join(lines)
