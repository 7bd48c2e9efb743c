"""The GPU (or TPU) program of the real train step, compiled without one ("deviceless").

Why: a GPU compiler makes choices a CPU program cannot show: whether the gradients are
all-reduced in float32 or after a conversion to bf16, whether every convolution runs in cuDNN,
how many kernels a step launches and what they move. XLA's GPU compiler needs only a device
description (`gpu_targets/*.txtpb`) to compile, so these are checked and measured on any
machine that has JAX's CUDA plugin installed (`jax-cuda12-plugin`, `jax-cuda12-pjrt`), GPU or
not. Deviceless compiles skip autotuning: the algorithm of each cuDNN call (and whether a GEMM
stays a Triton kernel) is not final; the dtypes and what is reduced between devices are.

The plugin must be registered when JAX starts its backends: it is where JAX_PLATFORMS is
`cpu` (as in the tests and benchmarks/comm.py), where JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1, or
where CUDA's libraries are installed; elsewhere it refuses to register for want of them.
Nothing here imports the plugin; this module imports on a CPU-only install too.

The same holds for a TPU: libtpu (`pip install libtpu`, the version jax's `tpu` extra pins)
compiles for a slice it only describes (`get_topology_desc(platform="tpu")`, e.g. v5e), with
JAX_PLATFORMS=cpu, no TPU and no TPU VM. It loads when the first TPU mesh is made; one process
at a time holds /tmp/libtpu_lockfile unless ALLOW_MULTIPLE_LIBTPU_LOAD=1; off a TPU VM it
warns that it cannot find the VM's metadata unless TPU_SKIP_MDS_QUERY=1,
TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES are set (tests/test_tpu_program.py sets them).
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies
from jax.sharding import Mesh

from lbsgd import hlo, parallel, train

TARGETS_DIR = Path(__file__).parent / "gpu_targets"
# name -> (platform, device description file (GPU) or libtpu's chip name (TPU), label)
TARGETS = {"h100": ("cuda", "h100_sxm.txtpb", "H100"), "v5e": ("tpu", "v5e", "TPU v5e")}


def plugin_installed() -> bool:
    """Whether JAX's CUDA plugin is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


def _tpu_slice(chip: str, devices: int) -> dict:
    """get_topology_desc's arguments for a slice of `devices` chips, `chip` e.g. v5e: AxB with
    A <= B <= 2A, all on one host up to 8 chips (as a v5e host holds them), on libtpu's
    default hosts beyond."""
    if devices < 1 or devices & (devices - 1):
        raise ValueError(f"a TPU slice here has a power-of-2 number of chips, not {devices}")
    a = 2 ** ((devices.bit_length() - 1) // 2)
    b = devices // a
    return {"platform": "tpu", "topology_name": f"{chip}:{a}x{b}",
            **({"chips_per_host_bounds": (a, b, 1)} if devices <= 8 else {})}


def target_mesh(target: str = "h100", devices: int = 8) -> Mesh:
    """lbsgd's 1-D mesh over `devices` GPUs of one host (or TPU chips), described by `target`."""
    platform, description, _ = TARGETS[target]
    arguments = (_tpu_slice(description, devices) if platform == "tpu" else
                 {"platform": "cuda", "target_config": (TARGETS_DIR / description).read_text(),
                  "topology": f"1x1x{devices}"})
    try:
        topology = topologies.get_topology_desc(**arguments)
    except Exception as error:  # noqa: BLE001 - JAX raises several kinds here
        raise RuntimeError(
            f"cannot compile for a {TARGETS[target][2]} without one: {error}. " + (
                "Install libtpu of the version jax[tpu] pins (one process at a time holds "
                "/tmp/libtpu_lockfile unless ALLOW_MULTIPLE_LIBTPU_LOAD=1)"
                if platform == "tpu" else
                "Install jax-cuda12-plugin and jax-cuda12-pjrt of the installed jax's version, "
                "and start JAX with JAX_PLATFORMS=cpu or JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (or "
                "with CUDA's libraries installed) so that the plugin registers")) from error
    return parallel.make_mesh(topology.devices)


def abstract_batch(ex: train.Experiment) -> dict:
    """One global training batch as the loop feeds it, shapes and shardings only."""
    kn, sharding = ex.config.global_batch_size, parallel.batch_sharding(ex.mesh)
    return {"image": jax.ShapeDtypeStruct((kn, *ex.dataset.image_shape), jnp.uint8,
                                          sharding=sharding),
            "label": jax.ShapeDtypeStruct((kn,), jnp.int32, sharding=sharding)}


def compile_for_target(step, *args, target: str = "h100"):
    """A jitted function compiled for `target`'s platform (CUDA, TPU) on abstract arguments:
    what runs on the GPUs (TPU chips)."""
    return step.trace(*args).lower(lowering_platforms=(TARGETS[target][0],)).compile()


def compile_train_step(config: ml_collections.ConfigDict, *, target: str = "h100",
                       devices: int = 8):
    """(experiment, its abstract state, compiled train step) of `config` on `devices` GPUs
    (TPU chips)."""
    ex = train.setup(config, target_mesh(target, devices))
    state = jax.eval_shape(ex.init_state)  # shapes and shardings: all a compile needs
    return ex, state, compile_for_target(ex.train_step, state, abstract_batch(ex), target=target)


def summarize(compiled, params, per_device_batch: int) -> dict:
    """hlo.summarize of a compiled program, with XLA's temporary buffer bytes per device."""
    memory = compiled.memory_analysis()
    return {**hlo.summarize(compiled.as_text(), params, per_device_batch),
            "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes)}
