"""Shared pytest setup: CPU only, quiet TensorFlow, and an eager/graph fixture."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(params=["eager", "function"])
def run(request):
    """Calls a zero-argument function eagerly or inside `tf.function`, by parameter."""

    def call(fn):
        if request.param == "eager":
            return fn()
        return tf.function(fn)()

    call.mode = request.param
    return call
