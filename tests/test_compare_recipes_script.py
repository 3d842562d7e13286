"""scripts/compare_recipes.py on two hand-made runs, as a user runs it (a subprocess)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_folder(path, accuracies, seconds, failed):
    path.mkdir()
    curve = [
        {
            "epoch": i,
            "meta_steps": 50 * (i + 1),
            "train_seconds": s,
            "cpu_seconds": s,
            "logs": {"val_sparse_categorical_accuracy": a, "failed_fraction": f},
        }
        for i, (a, s, f) in enumerate(zip(accuracies, seconds, failed, strict=True))
    ]
    (path / "curve.json").write_text(json.dumps(curve))
    (path / "flags.json").write_text(json.dumps({"lam": 2.0}))
    result = {"accuracy": 0.9, "ci95": 0.01, "test_lam": 0.0}
    (path / "test_end_of_comparison_lam0.json").write_text(json.dumps(result))


def test_compare_recipes_cuts_at_the_seconds_and_finds_the_time_to_target(tmp_path):
    _run_folder(tmp_path / "fast", [0.70, 0.85, 0.90], [100, 200, 300], [0.0, 0.0, 0.0])
    _run_folder(tmp_path / "slow", [0.60, 0.75, 0.82], [100, 200, 300], [0.5, 0.4, 0.3])
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "compare_recipes.py"),
            f"--runs={tmp_path / 'fast'},{tmp_path / 'slow'}",
            "--seconds=250",
            "--target=0.8",
            f"--output_dir={out}",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["run"]: row for row in json.loads((out / "comparison.json").read_text())}
    # Within 250 s: the last validations are at 200 s; "fast" reached 80% at 200 s, "slow" not.
    assert rows["fast"]["val_accuracy"] == 0.85 and rows["fast"]["seconds_to_target"] == 200
    assert rows["slow"]["seconds_to_target"] is None and rows["slow"]["meta_steps"] == 100
    assert abs(rows["slow"]["mean_failed_fraction"] - 0.45) < 1e-12
    assert "| fast | 100 | 200 | 85.0% | 200 | 0.00 | 90.00 +- 1.00% |" in proc.stdout
    assert (out / "comparison.png").stat().st_size > 0
