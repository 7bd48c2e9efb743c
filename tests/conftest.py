"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere.

The paper's semantics must not depend on the hardware, so the suite runs every
sharded code path on 8 host-platform devices, as an 8-GPU server would.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (imported by TFDS and clu) must never take an accelerator from JAX.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent XLA compilation cache for the session, shared by every run the tests start:
# most tests launch the public command on the same few configs, and each launch would
# otherwise compile the same train step again (13-25 s on 2 cores). The cached executable is
# the one XLA would build; what a run computes does not change.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lbsgd-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(items):
    """Slow tests first (a stable sort: files keep their order otherwise). pytest-xdist hands
    tests out in this order, so the minutes-long ones start while the other worker still has
    short tests to take, instead of one of them running alone at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
