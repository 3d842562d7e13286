"""The studies' one writer: Markdown tables, JSON with every number, PNG figures, CIs.

Every study writes `<name>.md`, `<name>.json` and its figures into its output folder through
`write`; tables come from `markdown_table`. Nothing here touches TensorFlow.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table; floats are written with 4 significant digits.

    Args:
      headers: Column titles.
      rows: One sequence of cells per row, as long as `headers`.

    Returns:
      The table, lines joined by newlines, without a trailing newline.

    Raises:
      ValueError: If a row's length differs from the number of headers.
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells, the table {len(headers)} columns: {row}")
        lines.append("| " + " | ".join(format_cell(c) for c in row) + " |")
    return "\n".join(lines)


def format_cell(value) -> str:
    """A table cell: floats to 4 significant digits, None as a dash, the rest by `str`."""
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval, `1.96 s / sqrt(n)`."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    if values.size == 1:
        return float(values[0]), 0.0
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(values.size))


def image_links(file_names: Sequence[str]) -> str:
    """Markdown that shows each image file, one per line."""
    return "".join(f"![{name}]({name})\n" for name in file_names)


def write_json(path: pathlib.Path, data) -> None:
    """Writes `data` as indented JSON (NumPy scalars and arrays converted)."""

    def default(obj):
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

    pathlib.Path(path).write_text(json.dumps(data, indent=2, default=default) + "\n")


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: pathlib.Path, *, dpi: int = 110) -> None:
    """Saves and closes a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def write(
    folder: pathlib.Path,
    name: str,
    *,
    markdown: str | None = None,
    data=None,
    figures: dict | None = None,
    dpi: int = 110,
) -> None:
    """Writes `<name>.md`, `<name>.json` (with `write_json`) and figures into `folder`.

    Args:
      folder: The output folder (it must exist).
      name: The file stem of the Markdown and JSON files.
      markdown: The Markdown text, written as is (None: no Markdown file).
      data: What goes into the JSON file (None: no JSON file).
      figures: `{file name: matplotlib figure}`, each saved (and closed) at `dpi`.
      dpi: Resolution of the figures. Default value: 110.
    """
    folder = pathlib.Path(folder)
    if markdown is not None:
        (folder / f"{name}.md").write_text(markdown)
    if data is not None:
        write_json(folder / f"{name}.json", data)
    for file_name, fig in (figures or {}).items():
        save_figure(fig, folder / file_name, dpi=dpi)
