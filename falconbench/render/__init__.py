"""Rendering: the one place that owns the rich Console and turns results into tables, JSON, CSV and Markdown."""
