"""Rendering of `falconbench models`."""

from __future__ import annotations

from typing import Sequence

from rich.table import Table

from ..zoo import ModelListing
from .console import to_json

HEADERS = ("Name", "Kind", "Model", "Weights")


def models_table(rows: Sequence[ModelListing]) -> Table:
    table = Table(title="falconbench models", title_justify="left", caption_justify="left",
                  caption="Profiles are configs only: plan them, or run them with --random-weights. Bundled models "
                          "carry real weights: `falconbench models get NAME` converts one once and prints its "
                          "folder.")
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows:
        weights = f"cached: {row.folder}" if row.folder else row.weights
        table.add_row(row.name, row.kind, row.description, weights)
    return table


def models_json(rows: Sequence[ModelListing]) -> str:
    return to_json([r.as_dict() for r in rows])
