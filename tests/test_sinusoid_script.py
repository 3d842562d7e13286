"""Smoke test of scripts/sinusoid.py, run as a user runs it (a subprocess)."""

import json
import re

import pytest

# Slow: runs scripts/sinusoid.py in subprocesses (meta-training).
pytestmark = pytest.mark.slow


def test_sinusoid_script_trains_evaluates_and_logs(tmp_path, run_script, summary_tags):
    proc = run_script(
        "sinusoid.py",
        "--meta_steps=10",
        "--meta_batch_size=2",
        "--eval_tasks=50",
        f"--logdir={tmp_path}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"query MSE (\S+) before adaptation, (\S+) after", proc.stdout)
    assert match, proc.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["meta_steps"] == 10
    assert abs(result["query_mse_before_adaptation"] - float(match.group(1))) < 1e-3
    tags = summary_tags(tmp_path / "train")
    assert "epoch_loss" in tags, tags


def test_sinusoid_script_rejects_bad_flags(run_script):
    proc = run_script("sinusoid.py", "--lam=0", timeout=300)
    assert proc.returncode != 0
    assert "--lam" in proc.stderr
