"""Train-step throughput of lbsgd against the plain data-parallel step, as one JSON object.

Why: what the paper's recipe (per-worker BatchNorm and running statistics, weight decay masked
off BN, the schedule in the step) costs against the step one would write first: Flax's
BatchNorm, `optax.sgd` and `pmean` in `shard_map`. benchmarks/README.md, section 1, has the
method and the results.

For each of the two steps: compile time (one compile; JAX's persistent compilation cache is on,
and `compile_cache` says whether the executable came from it), median step time and images/s
over --steps x --repeats timed steps, XLA's FLOP count of the compiled step and the MFU it
gives against the device's peak, peak memory (the device's allocator where it reports one,
else XLA's memory analysis; `peak_memory_source` says which) and, with --profile, a
jax.profiler trace of a few more steps and the 10 kernels that took longest in it.

    python -m benchmarks.train_step                    # CPU default: resnet18, 32 px, 32/device
    python -m benchmarks.train_step --model resnet50 --image_size 224 --per_device_batch 256 \\
        --dtype bfloat16 --profile /tmp/lbsgd_profile     # one H100 (README: the GPU rows)
"""

import collections
import functools
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from benchmarks import common, profiling
from lbsgd import models, parallel, train


class PlainBatchNorm(nnx.BatchNorm):
    """Flax's BatchNorm (over the layer's whole batch) as lbsgd's ResNet takes a norm."""

    def __init__(self, num_features: int, *, zero_init: bool = False, dtype=None):
        super().__init__(num_features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0),
                         scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return super().__call__(x, use_running_average=not train)


def make_baseline(ex: train.Experiment, *, global_bn: bool = False):
    """(init, step), jitted: the step one would write first, on lbsgd's ResNet with
    PlainBatchNorm: momentum SGD at a constant lr (the linear scaling rule's), the whole state
    replicated. In `shard_map` each device normalizes its own batch and the gradients, running
    statistics and metrics are `pmean`-ed; with `global_bn`, plain `jax.jit` on the sharded
    batch: BN normalizes over all of it (synchronized BN)."""
    lr, dtype = 0.1 * ex.config.global_batch_size / 256, jnp.dtype(ex.config.dtype)
    mean = (lambda tree: tree) if global_bn else functools.partial(
        jax.lax.pmean, axis_name=parallel.DATA_AXIS)
    tx = optax.sgd(lr, momentum=0.9)
    model = functools.partial(
        models.create_model, ex.config.model, num_classes=ex.config.num_classes, dtype=dtype,
        in_channels=ex.dataset.image_shape[-1], seed=ex.config.seed,
        norm=functools.partial(PlainBatchNorm, dtype=dtype))
    graphdef = nnx.split(nnx.eval_shape(model))[0]

    def init() -> train.TrainState:
        _, params, stats = nnx.split(model(), nnx.Param, nnx.BatchStat)
        params = nnx.to_pure_dict(params)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                batch_stats=nnx.to_pure_dict(stats), opt_state=tx.init(params))

    def step(state: train.TrainState, batch: dict):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.batch_stats)
            logits = model(train.normalize(batch["image"], ex.dataset, dtype), train=True)
            loss = train.cross_entropy(logits, batch["label"]).mean()
            return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(mean(grads), state.opt_state)
        top1 = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
        # Replicated running statistics must agree on every device: average them too.
        return (state.replace(step=state.step + 1, opt_state=opt_state, batch_stats=mean(stats),
                              params=optax.apply_updates(state.params, updates)),
                mean({"loss": loss, "train_top1": top1}))

    if not global_bn:
        step = jax.shard_map(step, mesh=ex.mesh, out_specs=PartitionSpec(), check_vma=False,
                             in_specs=(PartitionSpec(), PartitionSpec(parallel.DATA_AXIS)))
    replicated = parallel.replicated(ex.mesh)
    return (jax.jit(init, out_shardings=replicated),
            jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(ex.mesh)),
                    out_shardings=replicated, donate_argnums=0))


# Dense (no sparsity) tensor-core peaks, TFLOP/s per GPU, from NVIDIA's datasheets (which
# quote twice these, with 2:4 sparsity), keyed by jax's device_kind and the compute dtype.
# float32 is the TF32 peak: JAX's default precision lets a GPU compute float32 convolutions and
# matmuls in TF32. Devices not listed need --peak_tflops for an MFU.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.0, "float32": 495.0},  # H100 SXM5
    "NVIDIA H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "NVIDIA H200": {"bfloat16": 989.0, "float32": 495.0},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32": 156.0},
}
DEFAULT_CACHE = "~/.cache/lbsgd/jax_compilation_cache"
# JAX's own counters (jax/_src/compiler.py): a compile that consults the persistent cache
# records the first; one that loads its executable from there records the second too.
CACHE_EVENTS = collections.Counter()
CACHE_REQUEST, CACHE_HIT = ("/jax/compilation_cache/compile_requests_use_cache",
                            "/jax/compilation_cache/cache_hits")


def _memory_stats(devices) -> list[dict] | None:
    """Each device's allocator statistics; None where the backend keeps none (CPU)."""
    stats = [device.memory_stats() for device in devices]
    return None if any(not s or "peak_bytes_in_use" not in s for s in stats) else stats


def _device_peak(before: list[dict] | None, after: list[dict] | None) -> int | None:
    """The most bytes a step's state and program added on one device to what was already
    there: the rise of the device's high-water mark. None without statistics, or where the mark
    did not rise on every device: it is then an earlier program's, and JAX cannot reset it."""
    if before is None or after is None:
        return None
    rises = [a["peak_bytes_in_use"] - b["bytes_in_use"]
             for b, a in zip(before, after, strict=True)
             if a["peak_bytes_in_use"] > b["peak_bytes_in_use"]]
    return max(rises) if len(rises) == len(before) else None


class Stepper:
    """A jitted step with its own state on the shared batch; a call runs one step."""

    def __init__(self, step, init, batch, devices):
        self.memory_before = _memory_stats(devices)  # before this step's state exists
        self.step, self.state, self.batch, self.devices = step, init(), batch, devices
        self.compile_s, self.times = [], []  # each compilation's, each timed step's seconds
        self.memory_after = self.cache = None

    def compile(self) -> None:
        seen = CACHE_EVENTS.copy()
        start = time.perf_counter()  # trace + lower + compile (or load from the cache)
        lowered = self.step.lower(self.state, self.batch)
        self.compiled = lowered.compile()
        self.compile_s.append(time.perf_counter() - start)
        new = CACHE_EVENTS - seen
        self.cache = "hit" if new[CACHE_HIT] else "miss" if new[CACHE_REQUEST] else "off"
        # FLOPs of the program before XLA optimizes it, one device's (both steps run their body
        # in shard_map): the compiled program's count leaves out what becomes a library call,
        # i.e. every convolution on a GPU (cuDNN): 63x too few for ResNet-50 on an H200.
        self.flops = (lowered.cost_analysis() or {}).get("flops") or None

    def warm_up(self, steps: int) -> None:
        """Compile, run `steps` steps, and read the devices' peak memory (with this program's)."""
        self.compile()
        for _ in range(steps):
            self()
        self.memory_after = _memory_stats(self.devices)

    def __call__(self) -> float:
        """One step's seconds until its arrays are ready: JAX dispatches asynchronously."""
        start = time.perf_counter()
        self.state, _ = jax.block_until_ready(self.compiled(self.state, self.batch))
        return time.perf_counter() - start

    def profile(self, directory: Path, steps: int) -> dict:
        """Trace `steps` steps into `directory` and read back the kernels that took longest."""
        with jax.profiler.trace(directory):
            for _ in range(steps):
                self()
        return profiling.top_kernels(profiling.xplane_file(directory), steps=steps)

    def summary(self, images: int, peak_tflops: float | None) -> dict:
        median = statistics.median(self.times)
        flops = self.flops
        memory = self.compiled.memory_analysis()
        xla_bytes = None if memory is None else int(
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
        device_peak = _device_peak(self.memory_before, self.memory_after)
        return {
            "compile_s": min(self.compile_s), "compile_cache": self.cache,
            "timed_steps": len(self.times), "step_time_median_s": median,
            "step_time_min_s": min(self.times), "step_time_max_s": max(self.times),
            "images_per_sec": images / median,
            "images_per_sec_per_device": images / median / len(self.devices),
            "xla_flops_per_step_per_device": flops,
            "achieved_tflops_per_device": flops / median / 1e12 if flops else None,
            "mfu": flops / median / (peak_tflops * 1e12) if flops and peak_tflops else None,
            "xla_memory_bytes_per_device": xla_bytes,
            "peak_memory_bytes": xla_bytes if device_peak is None else device_peak,
            "peak_memory_source": self._memory_source(device_peak),
        }

    def _memory_source(self, device_peak: int | None) -> str:
        if device_peak is not None:
            return ("device: memory_stats() peak_bytes_in_use less the bytes in use before "
                    "this step's state existed, the most of any device")
        why = ("the device keeps no statistics" if self.memory_after is None
               else "the device's high-water mark was an earlier program's")
        return f"xla: memory_analysis(), argument + output + temp - alias, one device ({why})"


def time_alternately(first: Stepper, second: Stepper, *, repeats: int, steps: int) -> None:
    """Time `steps` steps of each per repetition, step by step, who goes first flipping every
    repetition: drift of a shared machine's load hits both alike."""
    for r in range(repeats):
        for _ in range(steps):
            for stepper in (first, second) if r % 2 == 0 else (second, first):
                stepper.times.append(stepper())


def peak_tflops(args, device_kind: str) -> tuple[float | None, str | None]:
    """One device's peak for the compute dtype, and where it comes from."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak_tflops"
    peak = PEAK_TFLOPS.get(device_kind, {}).get(args.dtype)
    return peak, None if peak is None else f"PEAK_TFLOPS[{device_kind!r}][{args.dtype!r}]"


def measure(args) -> dict:
    ex, batch = common.experiment(args)
    devices = list(ex.mesh.devices.flat)
    lbsgd = Stepper(ex.train_step, ex.init_state, batch, devices)
    params = common.param_size(lbsgd.state.params)  # counted now: a step donates the state
    lbsgd.warm_up(args.warmup_steps)
    init, step = make_baseline(ex)
    baseline = Stepper(step, init, batch, devices)
    baseline.warm_up(args.warmup_steps)
    # A process's first compilation also pays start-up costs: compile again from a cleared
    # cache, in turns; compile_s is the fastest.
    for r in range(1, args.compile_repeats):
        jax.clear_caches()
        for stepper in (baseline, lbsgd) if r % 2 else (lbsgd, baseline):
            stepper.compile()
            for _ in range(args.warmup_steps):
                stepper()
    time_alternately(lbsgd, baseline, repeats=args.repeats, steps=args.steps)
    kn, steppers = ex.config.global_batch_size, {"lbsgd": lbsgd, "baseline": baseline}
    peak, peak_source = peak_tflops(args, devices[0].device_kind)
    rows = {name: s.summary(kn, peak) for name, s in steppers.items()}
    if args.profile:  # after the timed steps, which the profiler would slow down
        for name, s in steppers.items():
            rows[name].update(s.profile(Path(args.profile) / name, args.profile_steps))
    return {
        "benchmark": "train_step", **{key: getattr(args, key) for key in common.STEP_FIELDS},
        "global_batch": kn, **params,
        "flop_count": "xla_cost_analysis: lowered step (before optimization), one device, "
                      "multiply-add = 2 FLOPs",
        "peak_tflops": peak, "peak_tflops_source": peak_source,
        "compilation_cache": args.compilation_cache or None, "profile_dir": args.profile,
        **rows,
        "ratio_images_per_sec": rows["lbsgd"]["images_per_sec"]
        / rows["baseline"]["images_per_sec"],
        # Median over adjacent step pairs of t_baseline / t_lbsgd: both steps of a pair see
        # about the same machine, so load that changes slowly cancels.
        "paired_ratio_median": statistics.median(
            b / a for a, b in zip(lbsgd.times, baseline.times, strict=True)),
        **common.environment(devices),
    }


def main() -> None:
    parser = common.parser(__doc__)
    common.add_step_arguments(parser, model="resnet18", image_size=32, devices=None)
    parser.add_argument("--steps", type=int, default=25, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=2, help="who steps first flips in each")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--compile_repeats", type=int, default=1,
                        help="the fastest counts; more than 1 needs --compilation_cache ''")
    parser.add_argument("--compilation_cache", default=DEFAULT_CACHE,
                        help="JAX's persistent compilation cache ('': off); a rerun of the same "
                             "step loads it from there (compile_cache: hit)")
    parser.add_argument("--peak_tflops", type=float,
                        help="one device's, for the dtype (default: PEAK_TFLOPS by device kind)")
    parser.add_argument("--profile", metavar="DIR",
                        help="trace steps into DIR/lbsgd and DIR/baseline (jax.profiler) and "
                             "list each one's 10 longest kernels")
    parser.add_argument("--profile_steps", type=int, default=3)
    args = parser.parse_args()
    if args.compilation_cache and args.compile_repeats > 1:
        parser.error("--compile_repeats > 1 would load the repeats from the persistent cache: "
                     "add --compilation_cache ''")
    if args.compilation_cache:
        args.compilation_cache = os.path.expanduser(args.compilation_cache)
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.monitoring.register_event_listener(lambda event, **_: CACHE_EVENTS.update([event]))
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
