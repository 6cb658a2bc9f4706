"""Rendering of `falconbench models`."""

from __future__ import annotations

from typing import Sequence

from ..zoo import ModelListing
from .console import Col, Grid, to_csv, to_json, to_markdown

# Narrow terminals fold Kind, then Weights, under the name; the description wraps between words.
COLUMNS = (Col("Name"), Col("Kind", priority=2), Col("Model", wrap=True), Col("Weights", priority=1))
CAPTION = ("Profiles are configs only: plan them, or run them with --random-weights. Bundled models carry real "
           "weights: `falconbench models get NAME` converts one once and prints its folder.")


def models_table(rows: Sequence[ModelListing]) -> Grid:
    body = [[row.name, row.kind, row.description, f"cached: {row.folder}" if row.folder else row.weights]
            for row in rows]
    return Grid(COLUMNS, body, title="falconbench models", caption=CAPTION)


def models_json(rows: Sequence[ModelListing]) -> str:
    return to_json([r.as_dict() for r in rows])


def models_csv(rows: Sequence[ModelListing]) -> str:
    return to_csv([r.as_dict() for r in rows])


def models_markdown(rows: Sequence[ModelListing]) -> str:
    return to_markdown(("Name", "Kind", "Model", "Weights", "Folder"),
                       [[r.name, r.kind, r.description, r.weights, r.folder or ""] for r in rows])


FORMATTERS = {"json": models_json, "csv": models_csv, "markdown": models_markdown}
