"""Smoke test of scripts/demo.py, run as a user runs it (a subprocess)."""

import math
import re

import pytest

# Slow: runs scripts/demo.py in subprocesses (gradient checks, then meta-training).
pytestmark = pytest.mark.slow


def test_demo_runs_and_its_checks_agree(run_script):
    proc = run_script("demo.py", "--meta_steps=20", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ridge = float(re.search(r"max relative error (\S+)", proc.stdout).group(1))
    fd = float(re.search(r"implicit: relative error (\S+)", proc.stdout).group(1))
    # Same oracles and tolerances as tests/test_implicit.py (closed form; float64 FD).
    assert ridge < 1e-9
    assert fd < 1e-6
    before, after = map(
        float, re.search(r"(\S+) before meta-training, (\S+) after", proc.stdout).groups()
    )
    assert math.isfinite(before) and math.isfinite(after), (before, after)
    # Part 3's claim: meta-training lowers the query loss after adaptation on the same 200
    # held-out tasks. Oracle: that loss at the initial theta, printed beside it. 20 meta-steps
    # gave after/before = 0.94 at seed 0 (4.2590 -> 4.0049) and 0.88-0.93 at seeds 1-4;
    # 0.97 keeps half the smallest drop as room for round-off between machines, and fails
    # when the meta-update does nothing (after == before) or goes the wrong way.
    assert after < 0.97 * before, (before, after)


def test_demo_rejects_bad_flags(run_script):
    proc = run_script("demo.py", "--meta_steps=-1", timeout=300)
    assert proc.returncode != 0
    assert "meta_steps" in proc.stderr
