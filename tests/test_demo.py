"""Smoke test of scripts/demo.py, run as a user runs it (a subprocess)."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_demo_runs_and_its_checks_agree():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--meta_steps=20"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ridge = float(re.search(r"max relative error (\S+)", proc.stdout).group(1))
    fd = float(re.search(r"implicit: relative error (\S+)", proc.stdout).group(1))
    # Same oracles and tolerances as tests/test_implicit.py (closed form; float64 FD).
    assert ridge < 1e-9
    assert fd < 1e-6
    before, after = map(
        float, re.search(r"(\S+) before meta-training, (\S+) after", proc.stdout).groups()
    )
    assert after == after and before == before  # finite numbers printed, not nan


def test_demo_rejects_bad_flags():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--meta_steps=-1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode != 0
    assert "meta_steps" in proc.stderr
