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
