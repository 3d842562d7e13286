"""Draws a training campaign's stages end to end: validation accuracy against meta-steps and
against training hours, one colour per stage, and the merged curve as JSON.

A campaign continued in stages (`scripts/train.py --init_model=<previous stage's model>`,
each stage in its own folder with its own `curve.json`) counts meta-steps on (the optimizer's
step carries over) but restarts its training clock; the hours here add each stage's seconds
to the previous stages' total.

Usage:
  python scripts/plot_campaign.py \\
      --stages=campaign/omniglot_5way_1shot/authors_lr3e-3,campaign/omniglot_5way_1shot/stage2_lr1e-3 \\
      --output=campaign/omniglot_5way_1shot/curve --title="Omniglot 5-way 1-shot"
"""

from __future__ import annotations

import json
import pathlib

import common
from absl import app
from absl import flags

_STAGES = flags.DEFINE_list(
    "stages", None, "Stage folders holding curve.json, in order.", required=True
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Writes <output>.png and <output>.json.", required=True
)
_TITLE = flags.DEFINE_string("title", "", "The figure's title.")


def merge_stages(stages: list[pathlib.Path]) -> list[dict]:
    """The stages' validation entries in order, each with its `stage` (folder name) and its
    `campaign_seconds` (its training seconds plus the previous stages' last)."""
    merged, offset = [], 0.0
    for stage in stages:
        path = stage / "curve.json"
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        entries = common.validation_curve(path)
        if not entries:
            raise ValueError(f"{path} has no validation entry")
        if merged and entries[0]["meta_steps"] <= merged[-1]["meta_steps"]:
            raise ValueError(
                f"{stage} starts at meta-step {entries[0]['meta_steps']}, not after the previous "
                f"stage's {merged[-1]['meta_steps']}"
            )
        merged += [
            {**e, "stage": stage.name, "campaign_seconds": offset + e["train_seconds"]}
            for e in entries
        ]
        offset = merged[-1]["campaign_seconds"]
    return merged


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        merged = merge_stages([pathlib.Path(s) for s in _STAGES.value])
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    output = pathlib.Path(_OUTPUT.value)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(merged, indent=1))
    stages = list(dict.fromkeys(e["stage"] for e in merged))
    common.plot_validation_curves(
        [(stage, [e for e in merged if e["stage"] == stage]) for stage in stages],
        output.with_suffix(".png"),
        seconds_key="campaign_seconds",
        title=_TITLE.value,
    )
    last = merged[-1]
    print(
        f"{len(merged)} validations over {len(set(e['stage'] for e in merged))} stages: "
        f"{100 * last['logs'][common.MONITOR]:.2f}% at meta-step {last['meta_steps']} after "
        f"{last['campaign_seconds'] / 3600:.2f} training hours; wrote "
        f"{output.with_suffix('.png')} and {output.with_suffix('.json')}"
    )


if __name__ == "__main__":
    app.run(main)
