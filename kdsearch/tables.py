"""Tables for people: one look for `kdsearch status`, `pareto` and `search`.

On a terminal a table is drawn with rich (aligned columns, a header rule); anywhere else (a pipe, a file,
a CI log, report.md) it is plain GitHub markdown without ANSI escape codes, so that it can be pasted into
an issue, diffed or grepped. The cells are formatted by one function in both cases, so the two renderings
hold the same text. Nothing here imports torch: these commands must answer at once.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# Column formats of a Pareto front (the search's tables): accuracy %, size MB, GBOPs, average bits, seconds.
FRONT_FORMAT: dict[str, str] = {"val_acc": ".2f", "size_mb": ".4f", "gbops": ".4g", "avg_bits": ".2f", "wall_s": ".0f"}


def format_cell(value: Any, fmt: str = ".4g") -> str:
    """A cell as text: NaN, None and pandas' NA print as '-', floats with `fmt`, the rest with str()."""
    if value is None or (isinstance(value, float) and value != value) or type(value).__name__ == "NAType":
        return "-"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def _cells(df: pd.DataFrame, floatfmt: Mapping[str, str] | None) -> list[list[str]]:
    fmts = floatfmt or {}
    return [[format_cell(v, fmts.get(col, ".4g")) for col, v in zip(df.columns, row)]
            for row in df.itertuples(index=False)]


def markdown_table(df: pd.DataFrame, floatfmt: Mapping[str, str] | None = None) -> str:
    """A small GitHub-markdown table (no tabulate dependency); NaN/None print as '-'."""
    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "\n".join("| " + " | ".join(cells) + " |" for cells in _cells(df, floatfmt))


def rich_table(df: pd.DataFrame, floatfmt: Mapping[str, str] | None = None, width: int | None = None) -> str:
    """The table drawn by rich for a terminal (with its escape codes), as text; numbers right-aligned."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in df.columns:
        table.add_column(str(col), justify="right" if df[col].dtype.kind in "iuf" else "left", no_wrap=True)
    for cells in _cells(df, floatfmt):
        table.add_row(*cells)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=width or shutil.get_terminal_size().columns)
    console.print(table)
    return out.getvalue().rstrip("\n")


def render_table(df: pd.DataFrame, floatfmt: Mapping[str, str] | None = None, *, rich: bool = False) -> str:
    """rich's drawing when `rich` (pass `stdout_is_terminal()`), else markdown (the default, for files and pipes)."""
    return rich_table(df, floatfmt) if rich else markdown_table(df, floatfmt)


def stdout_is_terminal() -> bool:
    """Whether tables printed now reach a person's terminal (not a pipe, a file or a captured stream)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())
