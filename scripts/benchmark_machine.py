"""What the machine can do and what a meta-step needs of it.

`machine_throughput` measures dense float32 GFLOP/s (a matmul and a convolution),
`processor` names the CPU and its low-precision instructions, and `useful_flops` counts
the FLOPs a meta-step of a configuration needs, so that its time reads as a fraction of
the machine's.
"""

from __future__ import annotations

import os
import pathlib
import time

import benchmark_config
import numpy as np

# CPU flags of the low-precision instructions, reported with the machine.
CPU_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def _forward_flops(config: benchmark_config.Config) -> float:
    """FLOPs of one image through the conv net (multiply-adds count 2)."""
    mini = benchmark_config.is_mini_imagenet(config)
    size, channels, flops = config.image_size, 3 if mini else 1, 0.0
    for _ in range(4):
        if not mini:  # a stride-2 convolution
            size = -(-size // 2)
        flops += 2.0 * size * size * 9 * channels * config.filters
        if mini:  # a stride-1 convolution, then 2x2 max pooling (its compares not counted)
            size //= 2
        channels = config.filters
    return flops + 2.0 * size * size * config.filters * config.ways


def useful_flops(config: benchmark_config.Config) -> float:
    """FLOPs a meta-step needs, counting a gradient as 3 and an HVP as 6 forward passes.

    Per task: the inner loop's `K` support gradients (MAML: plus `K` HVPs to backpropagate
    through them; iMAML-HF: `inner_cg_steps = 5` HVPs and one gradient per Newton step),
    one query gradient at the adapted weights, one query forward pass at theta (the
    pre-adaptation metrics) and, for iMAML, `cg_steps` HVPs.
    """
    forward = _forward_flops(config)
    support = config.ways * config.shots * forward
    query = config.ways * config.queries * forward
    k = config.inner_steps
    inner = {
        "maml": k * (3 + 6) * support,
        "fomaml": k * 3 * support,
        "imaml_hf": k * (5 * 6 + 3) * support,
    }.get(config.algorithm, k * 3 * support)
    solve = config.cg_steps * 6 * support if config.algorithm.startswith("imaml") else 0.0
    return config.meta_batch_size * (inner + solve + 3 * query + query)


def machine_throughput(
    *, matmul_size: int = 2048, conv_batch: int = 256, repeats: int = 10
) -> dict:
    """Dense float32 GFLOP/s of this machine: a square matmul and a 3x3 64->64 convolution.

    The defaults (a 2048^2 matmul, 256 images of 14x14x64, median of 10) are the measured
    run's; `--tiny` shrinks them (the numbers are then rough, but the smoke run is fast).
    """
    import tensorflow as tf

    n = matmul_size
    a = tf.random.normal([n, n])
    x = tf.random.normal([conv_batch, 14, 14, 64])
    k = tf.random.normal([3, 3, 64, 64])
    result = {}
    for name, fn, flops in (
        ("matmul_gflops", tf.function(lambda: tf.matmul(a, a)), 2 * n**3),
        (
            "conv_gflops",
            tf.function(lambda: tf.nn.conv2d(x, k, 1, "SAME")),
            2 * conv_batch * 14 * 14 * 9 * 64 * 64,
        ),
    ):
        fn().numpy()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn().numpy()
            times.append(time.perf_counter() - start)
        result[name] = flops / np.median(times) / 1e9
    return result


def processor() -> dict:
    """The CPU: its model name (the one `lscpu` prints), cores and low-precision flags."""
    model_name, cpu_flags = "unknown", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model_name == "unknown":
                model_name = value.strip()
            elif key.strip() == "flags" and not cpu_flags:
                cpu_flags = set(value.split())
    except OSError:
        pass
    return {
        "model_name": model_name,
        "num_cpus": os.cpu_count(),
        "flags": {flag: flag in cpu_flags for flag in CPU_FLAGS},
    }
