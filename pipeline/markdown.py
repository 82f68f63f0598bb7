"""Markdown pieces every report writer shares (the study report, sweeps, worlds, `overopt compare`): a pipe table
from a DataFrame, a file-name slug for a measure's figure, a duration in words."""

from __future__ import annotations

import re

import pandas as pd


def table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """`frame` as a Markdown pipe table, header from its columns; floats formatted with `floatfmt`, anything else
    with str(). Rows keep their columns' types (an int column is not shown as a float beside float columns)."""
    def cell(value) -> str:
        return f"{value:{floatfmt}}" if isinstance(value, float) else str(value)  # numpy float64 is a float

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def slug(text: str) -> str:
    """`text` with every run of characters other than ASCII letters and digits replaced by `_`, for file names."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def duration(seconds: float) -> str:
    """Seconds below two minutes, minutes (one decimal) from there."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
