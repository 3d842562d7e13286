"""scripts/studies/reporting.py: tables, confidence intervals, JSON, figures, the writer."""

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def reporting(study):
    return study


def test_markdown_table_formats_cells_and_checks_row_length(reporting):
    table = reporting.markdown_table(["a", "b", "c"], [[1, 0.123456, None], ["x", 1e-7, 2e6]])
    assert table.splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1 | 0.1235 | — |",
        "| x | 1.000e-07 | 2.000e+06 |",
    ]
    with pytest.raises(ValueError, match="2 cells, the table 3 columns"):
        reporting.markdown_table(["a", "b", "c"], [[1, 2]])


def test_mean_ci95_matches_the_normal_formula(reporting):
    # Oracle: the textbook formula 1.96 * sample std / sqrt(n), computed by hand.
    values = [0.0, 1.0, 1.0, 0.0]
    mean, ci = reporting.mean_ci95(values)
    assert mean == 0.5
    np.testing.assert_allclose(ci, 1.96 * np.sqrt(1 / 3) / 2, rtol=1e-15)
    assert reporting.mean_ci95([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        reporting.mean_ci95([])


def test_write_json_converts_numpy(reporting, tmp_path):
    path = tmp_path / "r.json"
    reporting.write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(2)})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": 2}


def test_save_figure_writes_a_png(reporting, tmp_path, assert_png):
    plt = reporting.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    reporting.save_figure(fig, tmp_path / "f.png")
    assert_png(tmp_path / "f.png")


def test_write_puts_markdown_json_and_figures_in_the_folder(reporting, tmp_path, assert_png):
    fig, ax = reporting.pyplot().subplots()
    ax.plot([0, 1], [1, 0])
    reporting.write(
        tmp_path, "study", markdown="# x\n", data={"a": np.arange(2)}, figures={"s.png": fig}
    )
    assert (tmp_path / "study.md").read_text() == "# x\n"
    assert json.loads((tmp_path / "study.json").read_text()) == {"a": [0, 1]}
    assert_png(tmp_path / "s.png")
    assert reporting.image_links(["a.png", "b.png"]) == "![a.png](a.png)\n![b.png](b.png)\n"
    reporting.write(tmp_path / "", "other", data={"b": 1})
    assert not (tmp_path / "other.md").exists() and (tmp_path / "other.json").exists()
