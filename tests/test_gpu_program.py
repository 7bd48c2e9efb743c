"""The GPU program of the real train step, compiled for H100s without a GPU (lbsgd/deviceless.py).

The CPU program cannot show what XLA's GPU compiler does: whether it all-reduces the float32
gradients after converting them to bf16, whether each convolution runs in cuDNN. These tests
need JAX's CUDA plugin (jax-cuda12-plugin and jax-cuda12-pjrt, no GPU): with the
CPU platform alone (tests/conftest.py) it registers without CUDA's libraries, and compiles.

    /work/gpuvenv/bin/python -m pytest tests/test_gpu_program.py -s   # -s: the transposes
"""

import jax
import pytest

pytest.importorskip("jax_plugins.xla_cuda12", reason="compiling for a GPU without one needs "
                    "JAX's CUDA plugin: pip install jax-cuda12-plugin jax-cuda12-pjrt")

from benchmarks.comm import attribute  # noqa: E402 - after the skip
from lbsgd import deviceless, hlo  # noqa: E402
from lbsgd.config import default_config  # noqa: E402

PER_DEVICE = 32  # images; at 64 px ResNet-50 compiles in about a minute on 2 CPU cores


@pytest.fixture(scope="module", params=[8, 1], ids=["8xH100", "1xH100"])
def program(request):
    """(devices, parameters, summary, compiled program) of ResNet-50's bf16 train step at
    64 px, compiled for H100s."""
    config = default_config()
    config.update(model="resnet50", image_size=64, dtype="bfloat16", dataset="synthetic",
                  global_batch_size=PER_DEVICE * request.param,
                  eval_batch_size=PER_DEVICE * request.param)
    ex, state, compiled = deviceless.compile_train_step(config, devices=request.param)
    return request.param, state.params, deviceless.summarize(compiled, state.params,
                                                               PER_DEVICE), compiled


def _shortcut_beta_bytes(params) -> int:
    """XLA all-reduces equal gradients once: a projection shortcut's BN beta has exactly the
    gradient of its block's last BN beta (tests/test_train.py)."""
    return sum(x.size * x.dtype.itemsize
               for path, x in jax.tree_util.tree_leaves_with_path(params)
               if "shortcut" in jax.tree_util.keystr(path) and path[-1].key == "beta")


@pytest.mark.slow
def test_gradients_are_all_reduced_in_float32_and_batchnorm_sends_nothing(program):
    devices, params, summary, compiled = program
    collectives = hlo.parse_collectives(compiled.as_text())
    if devices == 1:
        assert collectives == []  # a psum over one device is nothing
        return
    assert {c["op"] for c in collectives} == {"all-reduce"}
    split = attribute(collectives, params)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert {x.dtype.name for x in jax.tree.leaves(params)} == {"float32"}
    # Every gradient in float32 (not converted to bf16 before the reduction), once.
    reduced = [t for c in collectives for t in c.get("parts", c["tensors"]) if t["shape"]]
    assert {t["dtype"] for t in reduced} == {"f32"}
    assert split["gradient_allreduce_bytes"] == param_bytes - _shortcut_beta_bytes(params)
    assert split["batchnorm_bytes"] == 0
    assert split["scalar_bytes"] == 8  # the loss sum (f32) and the top-1 count (s32)


@pytest.mark.slow
def test_every_convolution_is_a_cudnn_call_on_bf16(program):
    devices, params, summary, _ = program
    convolutions = sum(x.ndim == 4 for x in jax.tree.leaves(params))  # 53 in ResNet-50
    cudnn = {target: n for target, n in summary["custom_calls"].items()
             if target.startswith("__cudnn$conv")}
    assert summary["convolutions_outside_custom_calls"] == 0
    # Forward, gradient of the filter and, but for the stem, gradient of the input.
    assert sum(cudnn.values()) == 3 * convolutions - 1, cudnn
    assert summary["cudnn_conv_operand_dtypes"] == ["bf16"]
    assert summary["temp_bytes"] > 0 and summary["kernels"] > sum(cudnn.values())
    activation = summary["activation_transposes"]
    print(f"\n{devices}xH100, ResNet-50 64 px bf16 {PER_DEVICE}/device: {summary['kernels']} "
          f"kernels, {summary['transposes']} transposes ({summary['transpose_bytes']:,} B), "
          f"{len(activation)} of activations ({sum(t['bytes'] for t in activation):,} B): "
          + ", ".join(f"{t['dtype']}{t['shape']}" for t in activation))


@pytest.mark.slow
def test_a_bfloat16_reduction_sends_bfloat16_gradients_on_gpus():
    """--config.grad_reduce_dtype=bfloat16 is what the GPU program does: every gradient
    all-reduced in bf16, half the float32 bytes."""
    config = default_config()
    config.update(model="resnet50", image_size=64, dtype="bfloat16", dataset="synthetic",
                  global_batch_size=PER_DEVICE * 8, eval_batch_size=PER_DEVICE * 8,
                  grad_reduce_dtype="bfloat16")
    _, state, compiled = deviceless.compile_train_step(config, devices=8)
    collectives = hlo.parse_collectives(compiled.as_text())
    reduced = [t for c in collectives for t in c.get("parts", c["tensors"]) if t["shape"]]
    assert {t["dtype"] for t in reduced} == {"bf16"}
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    split = attribute(collectives, state.params, "bfloat16")
    assert split["gradient_allreduce_bytes"] == (param_bytes
                                                 - _shortcut_beta_bytes(state.params)) // 2
