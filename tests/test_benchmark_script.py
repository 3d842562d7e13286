"""Smoke tests of scripts/benchmark.py at a tiny size, run as a user runs it."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

# Slow: runs scripts/benchmark.py in subprocesses, each timing meta-steps.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
# Every sweep off; a test then turns on the ones it checks (absl: the last value wins).
NO_SWEEPS = ("--algorithms=", "--task_batching=", "--batch_sizes=", "--cg_steps=", "--onednn=")


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", *args],
        capture_output=True,
        text=True,
        env=env or ENV,
        timeout=1200,
        check=False,
    )


def _results(proc, output_dir):
    """The results.json of a run that must have succeeded."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((output_dir / "results.json").read_text())


def test_benchmark_writes_tables_plot_and_results(tmp_path):
    proc = _run(
        f"--output_dir={tmp_path}",
        "--algorithms=imaml_gd,maml",
        "--inner_steps=1,3",
        "--task_batching=support",
        "--batch_sizes=2",
        "--cg_steps=2",
        "--onednn=fomaml",
    )
    results = _results(proc, tmp_path)
    table = (tmp_path / "benchmark.md").read_text()
    assert "| fomaml | 1 | 2 | — | support, oneDNN off |" in table
    assert "| fomaml | 1 | 2 | — | support, oneDNN on |" in table
    assert "- fomaml: oneDNN on is " in table
    assert "| imaml_gd | 3 | 2 | 5 | support |" in table and "| maml | 1 | 2 | — |" in table
    assert "### Task batching (iMAML-GD)" in table and "| support |" in table
    assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["machine"]["start"]["matmul_gflops"] > 0
    rows = {
        (r["sweep"], r["config"]["algorithm"], r["config"]["inner_steps"]): r
        for r in results["rows"]
    }
    # The batch-size row is the K = 1 row, measured once; two oneDNN rows share a key.
    assert len(rows) == 8 and len(results["rows"]) == 9
    onednn = [r for r in results["rows"] if r["sweep"] == "onednn"]
    # The worker's TensorFlow really ran with oneDNN off, then on.
    assert [r["result"]["onednn_enabled"] for r in onednn] == [False, True]
    for row in results["rows"]:
        assert row["result"]["step_s"] > 0 and row["result"]["peak_memory_mb"] > 100
        assert row["useful_gflop"] > 0
    split = rows[("task_batching", "imaml_gd", 1)]["result"]
    assert all(split[k] > 0 for k in ("inner_loop_s", "query_gradient_s", "linear_solve_s"))
    # More inner steps cost more useful FLOPs; MAML's backward pass makes its K steps dearer.
    imaml = [rows[("inner_steps", "imaml_gd", k)]["useful_gflop"] for k in (1, 3)]
    maml = [rows[("inner_steps", "maml", k)]["useful_gflop"] for k in (1, 3)]
    assert imaml[1] > imaml[0] and maml[1] - maml[0] > imaml[1] - imaml[0]


def test_configurations_above_the_memory_limit_are_stopped(tmp_path):
    proc = _run(
        f"--output_dir={tmp_path}",
        *NO_SWEEPS,
        "--algorithms=maml",
        "--inner_steps=1",
        "--memory_limit_gb=0.05",
    )
    results = _results(proc, tmp_path)
    assert [r["result"] for r in results["rows"]] == [
        {"error": "stopped above the memory limit (0.05 GB)"}
    ]
    assert "stopped above the memory limit" in (tmp_path / "benchmark.md").read_text()


def test_bad_flags_fail_before_any_work(tmp_path):
    proc = _run(f"--output_dir={tmp_path / 'out'}", "--algorithms=protonet")
    assert proc.returncode != 0 and "unknown 'protonet'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_mini_imagenet_net_with_onednn_off_and_on(tiny_mini_imagenet, tmp_path):
    proc = _run(
        f"--output_dir={tmp_path}",
        "--dataset=mini_imagenet",
        f"--data_dir={tiny_mini_imagenet}",
        "--ways=3",
        *NO_SWEEPS,
        "--onednn=imaml_gd",
    )
    results = _results(proc, tmp_path)
    assert [(r["config"]["dataset"], r["config"]["onednn"]) for r in results["rows"]] == [
        ("mini_imagenet", "0"),
        ("mini_imagenet", "1"),
    ]
    assert all(r["result"]["step_s"] > 0 for r in results["rows"])
    # 3 input channels and stride-1 convolutions before pooling: 16x16 RGB, 4 filters.
    forward = 2 * 9 * 4 * (16 * 16 * 3 + 8 * 8 * 4 + 4 * 4 * 4 + 2 * 2 * 4) + 2 * 4 * 3
    # 2 tasks of K = 1 support gradient (3 images), 5 CG HVPs, a query gradient and forward.
    support, query = 3 * forward, 6 * forward
    expected = 2 * (3 * support + 5 * 6 * support + 4 * query)
    assert results["rows"][0]["useful_gflop"] * 1e9 == pytest.approx(expected)
    assert "- imaml_gd: oneDNN on is " in (tmp_path / "benchmark.md").read_text()
    assert not (tmp_path / "benchmark.png").exists()  # no inner-steps sweep, no empty plot
    assert "Wrote benchmark.md, results.json in" in proc.stdout


def test_dtype_policies_side_by_side_with_meta_gradient_errors(tmp_path):
    proc = _run(
        f"--output_dir={tmp_path}",
        *NO_SWEEPS,
        "--precision=float32,mixed_bfloat16",
        # At --tiny's K = 1 every task's solve meets negative curvature and the step is
        # skipped (a zero meta-gradient); at K = 16 one of the two tasks is solved.
        "--reference_inner_steps=16",
    )
    results = _results(proc, tmp_path)
    assert set(results["machine"]["processor"]["flags"]) >= {"avx512_bf16", "amx_bf16"}
    rows = results["rows"]
    # The policies with oneDNN on, then float32 with oneDNN off (the round-off reference).
    assert [(r["sweep"], r["config"]["policy"], r["config"]["onednn"]) for r in rows] == [
        ("precision", "float32", "1"),
        ("precision", "mixed_bfloat16", "1"),
        ("precision", "float32", "0"),
    ]
    float32, bfloat16, float32_off = (r["result"] for r in rows)
    # The worker's TensorFlow had oneDNN as asked; the learner computed in the policy's
    # dtype with float32 variables, from the same initial weights.
    assert float32["onednn_enabled"] and bfloat16["onednn_enabled"]
    assert float32_off["onednn_enabled"] is False and float32_off["compute_dtype"] == "float32"
    assert float32_off["initial_weights_sha1"] == float32["initial_weights_sha1"]
    assert rows[2]["meta_grad_error_vs_float32"] is not None
    assert (float32["compute_dtype"], bfloat16["compute_dtype"]) == ("float32", "bfloat16")
    assert float32["variable_dtype"] == bfloat16["variable_dtype"] == "float32"
    assert float32["initial_weights_sha1"] == bfloat16["initial_weights_sha1"]
    assert all(m["step_s"] > 0 and m["step_cpu_s"] > 0 for m in (float32, bfloat16))
    assert float32["meta_grad_norm"] > 0
    # Oracle: float32 is its own reference (0 exactly); bfloat16 rounds, so it differs.
    assert rows[0]["meta_grad_error_vs_float32"] == 0.0
    assert rows[0]["common_tasks_error_vs_float32"] == 0.0
    assert rows[0]["failure_flips_vs_float32"] == 0 and rows[0]["solved_in_both"] >= 1
    assert rows[1]["meta_grad_error_vs_float32"] > 0
    # Oracle: the meta-step's gradient is the mean of the solved tasks' gradients, each read
    # alone. Tolerance: float32 rounding (6e-8) through K = 16 inner steps and the solve,
    # batched against one task at a time; measured 8e-7.
    solved = 2 - len(float32["failed_tasks"])
    assert solved >= 1 and float32["meta_grad_failed_fraction"] == 1 - solved / 2
    assert float32["rebuilt_from_tasks_error"] < 1e-5
    table = (tmp_path / "benchmark.md").read_text()
    assert "### Dtype policies with oneDNN on" in table
    assert (
        "| float32 | float32 | on | " in table and "| 1.00x, 1.00x | 0.00e+00 | 0.00e+00 (" in table
    )
    assert "| mixed_bfloat16 | bfloat16 | on | " in table
    assert "| float32 (round-off reference) | float32 | off | " in table
    assert "Initial weights: the same in every run" in table
    assert "Processor: " in table and "avx512_bf16 " in table


def test_precision_needs_float32_as_the_reference(tmp_path):
    (tmp_path / "tmp").mkdir()
    env = dict(ENV, TMPDIR=str(tmp_path / "tmp"))
    proc = _run(f"--output_dir={tmp_path / 'out'}", "--precision=mixed_bfloat16", env=env)
    assert proc.returncode != 0 and "float32 must be one of the policies" in proc.stderr
    # Nothing written: no output folder, no temporary episodes folder.
    assert not (tmp_path / "out").exists() and not list((tmp_path / "tmp").iterdir())
