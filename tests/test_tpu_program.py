"""The TPU program of the real train step, compiled for v5e chips without a TPU
(lbsgd/deviceless.py, target "v5e").

The contract of tests/test_gpu_program.py where it is the same on a TPU: the gradients are
all-reduced once, in config.grad_reduce_dtype, exactly their bytes at that dtype, BatchNorm
sends nothing, and every convolution runs in the compute dtype (bf16). These tests need
libtpu (the version jax[tpu] pins, e.g. `pip install 'libtpu==0.0.42.*'` for jax 0.10.2), no
TPU: with the CPU platform alone (tests/conftest.py) it compiles for a slice it only
describes. Each ResNet-50 compile took libtpu 8 - 14 min on 2 busy cores (load average 21).

    /work/tpuvenv/bin/python -m pytest tests/test_tpu_program.py
"""

import os

import jax
import pytest

pytest.importorskip("libtpu", reason="compiling for a TPU without one needs libtpu: "
                    "pip install libtpu of the version jax[tpu] pins")

# Off a TPU VM libtpu looks for the VM's metadata and warns at length; these say there is none.
# Several test processes (pytest-xdist) may each load it: allow that.
for name, value in {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-8",
                    "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
    os.environ.setdefault(name, value)

from benchmarks.comm import attribute  # noqa: E402 - after the skip
from lbsgd import deviceless, hlo  # noqa: E402
from lbsgd.config import default_config  # noqa: E402

PER_DEVICE = 32  # images


def _config(devices: int, **fields):
    config = default_config()
    config.update(model="resnet50", image_size=64, dtype="bfloat16", dataset="synthetic",
                  global_batch_size=PER_DEVICE * devices, eval_batch_size=PER_DEVICE * devices,
                  **fields)
    return config


def _shortcut_beta_bytes(params) -> int:
    """XLA all-reduces equal gradients once (tests/test_gpu_program.py)."""
    return sum(x.size * x.dtype.itemsize
               for path, x in jax.tree_util.tree_leaves_with_path(params)
               if "shortcut" in jax.tree_util.keystr(path) and path[-1].key == "beta")


def _check_gradient_reduction(compiled, params, reduce_dtype: str) -> None:
    collectives = hlo.parse_collectives(compiled.as_text())
    assert {c["op"] for c in collectives} == {"all-reduce"}
    reduced = [t for c in collectives for t in c.get("parts", c["tensors"]) if t["shape"]]
    assert {t["dtype"] for t in reduced} == {{"float32": "f32", "bfloat16": "bf16"}[reduce_dtype]}
    split = attribute(collectives, params, reduce_dtype)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert {x.dtype.name for x in jax.tree.leaves(params)} == {"float32"}
    assert split["gradient_allreduce_bytes"] == (
        (param_bytes - _shortcut_beta_bytes(params)) * (2 if reduce_dtype == "bfloat16" else 4)
        // 4)
    assert split["batchnorm_bytes"] == 0
    assert split["scalar_bytes"] == 8  # the loss sum (f32) and the top-1 count (s32)


def test_a_slice_of_one_host_is_described():
    mesh = deviceless.target_mesh("v5e", 8)
    devices = list(mesh.devices.flat)
    assert [d.platform for d in devices] == ["tpu"] * 8
    assert {d.process_index for d in devices} == {0}  # a v5e host holds 8 chips
    assert len(deviceless.target_mesh("v5e", 1).devices.flat) == 1
    with pytest.raises(ValueError, match="power-of-2"):
        deviceless.target_mesh("v5e", 6)


@pytest.mark.slow
@pytest.mark.parametrize("reduce_dtype", ["float32", "bfloat16"])
def test_gradients_are_all_reduced_once_in_their_dtype_and_batchnorm_sends_nothing(
        reduce_dtype):
    _, state, compiled = deviceless.compile_train_step(
        _config(8, grad_reduce_dtype=reduce_dtype), target="v5e", devices=8)
    _check_gradient_reduction(compiled, state.params, reduce_dtype)
    # The TPU's convolutions are XLA's own (no library call): all of them in bf16.
    computations, _ = hlo.parse_module(compiled.as_text())
    by_name = {i.name: i for body in computations.values() for i in body}
    dtypes = [{t["dtype"] for name in i.operands for t in by_name[name].tensors}
              | {i.tensors[0]["dtype"]}
              for body in computations.values() for i in body if i.op == "convolution"]
    convolutions = sum(x.ndim == 4 for x in jax.tree.leaves(state.params))  # 53
    # Forward, gradients of filter and input (none for the stem's), and the classifier's
    # matrix products, which the TPU compiler writes as convolutions.
    assert len(dtypes) == 3 * convolutions - 1 + 3
    assert set().union(*dtypes) == {"bf16"}
