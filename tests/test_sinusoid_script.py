"""Smoke test of scripts/sinusoid.py, run as a user runs it (a subprocess)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

# Slow: runs scripts/sinusoid.py in subprocesses (meta-training).
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")


def test_sinusoid_script_trains_evaluates_and_logs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "sinusoid.py"),
            "--meta_steps=10",
            "--meta_batch_size=2",
            "--eval_tasks=50",
            f"--logdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"query MSE (\S+) before adaptation, (\S+) after", proc.stdout)
    assert match, proc.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["meta_steps"] == 10
    assert abs(result["query_mse_before_adaptation"] - float(match.group(1))) < 1e-3
    import tensorflow as tf

    tags = {
        value.tag
        for path in (tmp_path / "train").glob("events.out.tfevents.*")
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
    }
    assert "epoch_loss" in tags, tags


def test_sinusoid_script_rejects_bad_flags():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sinusoid.py"), "--lam=0"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert "--lam" in proc.stderr
