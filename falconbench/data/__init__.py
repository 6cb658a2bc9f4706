"""Data shipped with falconbench: the default evaluation text for quality measurements (see SOURCE.md)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
EVAL_TEXT = DATA_DIR / "northanger_abbey.txt"  # Jane Austen, Northanger Abbey, Chapters 1-5 (public domain)
EVAL_TEXT_NAME = "northanger-abbey-1-5"
