"""Compares training runs by time to accuracy: a Markdown table and one overlay plot.

Reads each run folder's `curve.json` (written by `scripts/train.py`: validation accuracy per
epoch against meta-steps and training seconds) and, when present, its
`test_end_of_comparison_lam*.json` files (`scripts/evaluate.py --output=...` on the run's
model at the end of the comparison, adapted with that test-time lam). Prints the table and
writes `comparison.md`, `comparison.json` and `comparison.png` to `--output_dir`.

Usage:
  python scripts/compare_recipes.py --runs=campaign/omniglot_5way_1shot/paper_drop,... \\
      --output_dir=campaign/omniglot_5way_1shot --seconds=2100 --target=0.80
"""

from __future__ import annotations

import json
import pathlib

import common
import numpy as np
from absl import app
from absl import flags

_RUNS = flags.DEFINE_list("runs", None, "Run folders holding curve.json.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the comparison.")
_SECONDS = flags.DEFINE_float(
    "seconds",
    None,
    "Compare the runs over their first this many training seconds (default: the shortest "
    "run's end); later epochs are left out of the table and the plot.",
)
_TARGET = flags.DEFINE_float("target", 0.80, "Report the training seconds to reach this accuracy.")

MONITOR = common.MONITOR


def summarize(run: pathlib.Path, *, seconds: float, target: float) -> dict:
    """One run's row: accuracy at `seconds`, time to `target`, failed fraction, test scores."""
    curve = common.validation_curve(run / "curve.json", until_seconds=seconds)
    if not curve:
        raise ValueError(f"{run}/curve.json has no validation entry within {seconds} s")
    times = np.array([e["train_seconds"] for e in curve])
    accuracy = np.array([e["logs"][MONITOR] for e in curve])
    reached = times[accuracy >= target]
    failed = [e["logs"].get("failed_fraction", 0.0) for e in curve]
    row = {
        "run": run.name,
        "meta_steps": curve[-1]["meta_steps"],
        "train_seconds": float(times[-1]),
        "val_accuracy": float(accuracy[-1]),  # the last validation within `seconds`
        "seconds_to_target": float(reached[0]) if reached.size else None,
        "mean_failed_fraction": float(np.mean(failed)),
        "flags": json.loads((run / "flags.json").read_text()),
    }
    for path in sorted(run.glob("test_end_of_comparison_lam*.json")):
        result = json.loads(path.read_text())
        row[f"test_lam{result['test_lam']:g}"] = (result["accuracy"], result["ci95"])
    return row


def markdown(rows: list[dict], *, seconds: float, target: float) -> str:
    lams = sorted({k for row in rows for k in row if k.startswith("test_lam")})
    head = (
        f"| run | meta-steps in {seconds:.0f} s | last validation at (s) | validation accuracy | "
        f"s to {100 * target:.0f}% | failed fraction | "
        + " | ".join(f"test, adapted at lam {k[8:]}" for k in lams)
        + " |"
    )
    lines = [head, "|" + " --- |" * (6 + len(lams))]
    for row in rows:
        cells = [
            row["run"],
            str(row["meta_steps"]),
            f"{row['train_seconds']:.0f}",
            f"{100 * row['val_accuracy']:.1f}%",
            "not reached"
            if row["seconds_to_target"] is None
            else f"{row['seconds_to_target']:.0f}",
            f"{row['mean_failed_fraction']:.2f}",
        ]
        cells += [
            f"{100 * row[k][0]:.2f} +- {100 * row[k][1]:.2f}%" if k in row else "" for k in lams
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[pathlib.Path], path: pathlib.Path, *, seconds: float) -> None:
    fig, axes = common.accuracy_axes(figsize=(11, 4))
    for run in runs:
        curve = common.validation_curve(run / "curve.json", until_seconds=seconds)
        accuracy = [100 * e["logs"][MONITOR] for e in curve]
        axes[0].plot([e["train_seconds"] / 60 for e in curve], accuracy, marker=".", label=run.name)
        axes[1].plot([e["meta_steps"] for e in curve], accuracy, marker=".", label=run.name)
    axes[0].set_xlabel("training minutes (side by side, validation excluded)")
    axes[1].set_xlabel("meta-steps")
    axes[0].set_ylabel("validation accuracy (%)")
    axes[1].legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runs = [pathlib.Path(r) for r in _RUNS.value]
    for run in runs:
        if not (run / "curve.json").is_file():
            raise app.UsageError(f"{run} has no curve.json")
    seconds = _SECONDS.value
    if seconds is None:
        seconds = min(json.loads((r / "curve.json").read_text())[-1]["train_seconds"] for r in runs)
    rows = [summarize(r, seconds=seconds, target=_TARGET.value) for r in runs]
    table = markdown(rows, seconds=seconds, target=_TARGET.value)
    print(table)
    if _OUTPUT_DIR.value:
        out = pathlib.Path(_OUTPUT_DIR.value)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(table)
        (out / "comparison.json").write_text(json.dumps(rows, indent=1))
        plot(runs, out / "comparison.png", seconds=seconds)


if __name__ == "__main__":
    app.run(main)
