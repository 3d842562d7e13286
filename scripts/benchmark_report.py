"""The benchmark's report: Markdown tables (`benchmark.md`) and the figure (`benchmark.png`).

`rows` are those of `results.json`: `{"sweep", "config", "result", "useful_gflop"}`, plus
the meta-gradient errors of the dtype-policy rows (`benchmark_precision`). One table per
sweep, then the oneDNN speed ratios and the dtype-policy table.
"""

from __future__ import annotations

import os
import pathlib

import benchmark_config


def _cell(result: dict, key: str, fmt: str) -> str:
    return "—" if result.get(key) is None else format(result[key], fmt)


def write_report(output_dir: pathlib.Path, rows: list[dict], machine: dict) -> str:
    """The Markdown tables; returns them."""
    cpu = machine["processor"]
    lines = [
        f"Machine: matmul {machine['start']['matmul_gflops']:.0f} / conv "
        f"{machine['start']['conv_gflops']:.0f} GFLOP/s at the start, "
        f"{machine['end']['matmul_gflops']:.0f} / {machine['end']['conv_gflops']:.0f} at the end "
        "(float32).",
        "",
        f"Processor: {cpu['model_name']}, {cpu['num_cpus']} CPUs; flags: "
        + ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in cpu["flags"].items())
        + ".",
        "",
    ]
    sections = (
        ("inner_steps", "Time and peak memory against inner steps K"),
        ("task_batching", "Task batching (iMAML-GD)"),
        ("batch_size", "Scaling with meta-batch size (iMAML-GD)"),
        ("cg_steps", "Scaling with CG steps (iMAML-GD)"),
        ("onednn", "TensorFlow's oneDNN kernels off and on (batching column: oneDNN)"),
    )
    for sweep, title in sections:
        section = [r for r in rows if r["sweep"] == sweep]
        if not section:
            continue
        lines += [
            f"### {title}",
            "",
            "| algorithm | K | tasks | CG | batching | s / meta-step | inner loop s | "
            "query grad s | solve s | peak MB | useful GFLOP | GFLOP/s | % of conv peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in section:
            c, m = r["config"], r["result"]
            if "error" in m:
                rate = pct = "—"
                step = m["error"] if len(m["error"]) < 80 else m["error"][:77] + "..."
            else:
                rate_value = r["useful_gflop"] / m["step_s"]
                rate = f"{rate_value:.1f}"
                pct = f"{100 * rate_value / machine['start']['conv_gflops']:.0f}%"
                step = f"{m['step_s']:.3f}"
            lines.append(
                f"| {c['algorithm']} | {c['inner_steps']} | {c['meta_batch_size']} | "
                f"{c['cg_steps'] if c['algorithm'].startswith('imaml') else '—'} | "
                f"{_batching_cell(sweep, c, m)} | {step} | "
                f"{_cell(m, 'inner_loop_s', '.3f')} | {_cell(m, 'query_gradient_s', '.3f')} | "
                f"{_cell(m, 'linear_solve_s', '.3f')} | {_cell(m, 'peak_memory_mb', '.0f')} | "
                f"{r['useful_gflop']:.1f} | {rate} | {pct} |"
            )
        lines.append("")
    lines += _onednn_ratios(rows)
    lines += _precision_table(rows)
    text = "\n".join(lines)
    (output_dir / "benchmark.md").write_text(text)
    return text


def _batching_cell(sweep: str, config: dict, result: dict) -> str:
    batching = result.get("task_batching_used", config["task_batching"])
    if sweep != "onednn":
        return batching
    return f"{batching}, oneDNN {'on' if config['onednn'] == '1' else 'off'}"


def _onednn_ratios(rows: list[dict]) -> list[str]:
    """One line per algorithm: its meta-step time with oneDNN off over the time with it on."""
    times = {}
    for r in rows:
        if r["sweep"] == "onednn" and "error" not in r["result"]:
            times[(r["config"]["algorithm"], r["config"]["onednn"])] = r["result"]["step_s"]
    lines = [
        f"- {algorithm}: oneDNN on is {times[(algorithm, '0')] / times[(algorithm, '1')]:.2f} "
        f"times as fast ({times[(algorithm, '0')]:.3f} s against {times[(algorithm, '1')]:.3f} s)"
        for algorithm in dict.fromkeys(a for a, _ in times)
        if (algorithm, "0") in times and (algorithm, "1") in times
    ]
    return lines + [""] if lines else []


def _precision_table(rows: list[dict]) -> list[str]:
    """Dtype policies side by side: meta-step time and meta-gradient errors against float32."""
    section = [r for r in rows if r["sweep"] == "precision"]
    if not section:
        return []
    reference = next(
        (
            r["result"]
            for r in section
            if (r["config"]["policy"], r["config"]["onednn"]) == ("float32", "1")
        ),
        {"error": ""},
    )
    c = section[0]["config"]
    lines = [
        "### Dtype policies with oneDNN on: meta-step time and meta-gradient error against float32",
        "",
        f"{c['algorithm']}, K = {c['inner_steps']}, meta-batch {c['meta_batch_size']}, "
        f"{c['cg_steps']} CG steps, {c['filters']} filters. Time: median of {c['repeats']} "
        "meta-steps (Adam) after warm-up, wall-clock and CPU seconds of the process (which "
        "other jobs on the same cores inflate less). Errors: `||g - g_float32|| / ||g_float32||` of "
        "`SGD(1.0)` steps from the same seed-0 weights on the same episode: the meta-step's "
        "gradient (the mean over the tasks whose solve did not fail), then the tasks solved "
        "under both policies, each read alone (their sum, and the median task). float32 "
        "with oneDNN off is the round-off reference: the same float32 arithmetic, summed in "
        "another order.",
        "",
        "| policy | compute dtype | oneDNN | s / meta-step | CPU s / meta-step | "
        "speed vs float32 (wall, CPU) | "
        "meta-step error | error, tasks solved in both | median task error | "
        "failed solves (differ from float32) | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bounds = []
    for r in section:
        m, policy = r["result"], r["config"]["policy"]
        if r["config"]["onednn"] == "0":
            policy += " (round-off reference)"
        if "error" in m:
            lines.append(f"| {policy} | — | — | {m['error'][:77]} |" + " — |" * 7)
            continue
        speed = "—"
        if "error" not in reference:
            speed = (
                f"{reference['step_s'] / m['step_s']:.2f}x, "
                f"{reference['step_cpu_s'] / m['step_cpu_s']:.2f}x"
            )
        failed = f"{len(m['failed_tasks'])} / {c['meta_batch_size']}"
        if r.get("failure_flips_vs_float32") is not None:
            failed += f" ({r['failure_flips_vs_float32']})"
        both = "" if r.get("solved_in_both") is None else f" ({r['solved_in_both']} tasks)"
        lines.append(
            f"| {policy} | {m['compute_dtype']} | {'on' if m['onednn_enabled'] else 'off'} | "
            f"{m['step_s']:.3f} | {m['step_cpu_s']:.3f} | {speed} | "
            f"{_cell(r, 'meta_grad_error_vs_float32', '.2e')} | "
            f"{_cell(r, 'common_tasks_error_vs_float32', '.2e')}"
            f"{both} | "
            f"{_cell(r, 'median_task_error_vs_float32', '.2e')} | {failed} | "
            f"{m['peak_memory_mb']:.0f} |"
        )
        bounds.append(m["readoff_bound"])
    hashes = {
        r["result"].get("initial_weights_sha1") for r in section if "error" not in r["result"]
    }
    lines += [
        "",
        "Initial weights: "
        + ("the same in every run" if len(hashes) == 1 else f"DIFFERENT ({len(hashes)} hashes)")
        + " (SHA-1 of the float32 values). Read-off resolution (float32 rounding of the "
        "stepped weights, relative to the meta-step gradient): at most "
        + (f"{max(bounds):.1e}." if bounds and None not in bounds else "— (a zero meta-gradient)."),
        "",
    ]
    return lines


def plot(output_dir: pathlib.Path, rows: list[dict]) -> bool:
    """Time and peak memory against K, one line per algorithm (Figure 2b of the paper)."""
    if not any(r["sweep"] == "inner_steps" for r in rows):
        return False  # nothing to plot (e.g. a run of the oneDNN comparison only)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for algorithm in benchmark_config.ALGORITHMS:
        points = [
            (r["config"]["inner_steps"], r["result"])
            for r in rows
            if r["sweep"] == "inner_steps" and r["config"]["algorithm"] == algorithm
        ]
        points = [(k, m) for k, m in points if "error" not in m]
        if not points:
            continue
        ks = [k for k, _ in points]
        style = "--" if "maml" in algorithm and not algorithm.startswith("imaml") else "-"
        ax_time.plot(ks, [m["step_s"] for _, m in points], style, marker="o", label=algorithm)
        ax_mem.plot(
            ks,
            [m["peak_memory_mb"] / 1024 for _, m in points],
            style,
            marker="o",
            label=algorithm,
        )
    ax_time.set(xlabel="inner steps K", ylabel="seconds per meta-step", title="Compute")
    ax_mem.set(xlabel="inner steps K", ylabel="peak memory (GB, VmHWM)", title="Memory")
    for ax in (ax_time, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    c = next(r["config"] for r in rows)
    fig.suptitle(
        f"Meta-step on {'mini-ImageNet' if c['dataset'] == 'mini_imagenet' else 'Omniglot'} "
        f"{c['ways']}-way {c['shots']}-shot, {c['queries']} queries per "
        f"class, conv net ({c['filters']} filters), meta-batch {c['meta_batch_size']}, "
        f"{os.cpu_count()} CPU cores"
    )
    fig.tight_layout()
    fig.savefig(output_dir / "benchmark.png", dpi=110)
    plt.close(fig)
    return True
