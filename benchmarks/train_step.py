"""Train-step throughput of lbsgd against a plain data-parallel baseline, as JSON lines.

Why: lbsgd's train step is the paper's (Goyal et al. 2017, Sec. 2-3): BatchNorm statistics per
virtual worker of n images (`GroupedBatchNorm`, per-worker running averages), weight decay
masked off BN, the learning-rate schedule inside the step. This script measures what that costs
against the step anyone would write first: the same ResNet (same convs, dtype and shardings)
with Flax's plain `nnx.BatchNorm` over each device's whole batch, replicated running
statistics, and `optax.sgd(lr, momentum=0.9)`, data-parallel with `shard_map` inside one
`jax.jit` (gradients and running statistics averaged with `pmean`, the classic pmap recipe).

Only the step is measured: the batch is random uint8 pixels created once on the devices, in the
batch sharding, and reused. Every step is timed alone (dispatch to `block_until_ready`), after
warm-up, and lbsgd and baseline steps alternate so that drift of a shared machine hits both
alike. Medians are the headline; min and max show the spread.

One JSON object per configuration (model x image size x per-device batch x dtype) on stdout:

    python benchmarks/train_step.py                    # CPU default: resnet18, 32 px, 32/device
    python benchmarks/train_step.py --per_device_batch 32 256 --steps 10 --repeats 2
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_step.py --devices 8
    python benchmarks/train_step.py --model resnet50 --image_size 224 --dtype bfloat16 \\
        --peak_tflops 989   # e.g. on an H100 (dense bf16 peak); MFU is null without a peak

FLOPs are XLA's count (`compiled.cost_analysis()['flops']`) for the compiled step of one
device: every op of forward, backward and update, a multiply-add counted as 2 FLOPs. (The
"4.1 GFLOPs" often quoted for a 224-px ResNet-50 forward pass counts multiply-adds, i.e. about
8.2 GFLOPs in XLA's unit.) MFU = that count / step time / peak, only when --peak_tflops is given.
"""

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lbsgd and configs/

import flax  # noqa: E402
import flax.struct  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

from configs import default  # noqa: E402
from lbsgd import input_pipeline, models, parallel, train  # noqa: E402
from lbsgd.models import resnet  # noqa: E402


def lbsgd_config(model: str, image_size: int, global_batch: int, bn_group_size: int,
                 dtype: str, num_classes: int):
    """The paper's recipe (configs/default.py) on synthetic ImageNet-shaped data."""
    config = default.get_config()
    config.model = model
    config.dtype = dtype
    config.dataset = "synthetic"
    config.num_classes = num_classes
    config.image_size = image_size
    config.global_batch_size = global_batch
    config.bn_group_size = bn_group_size
    config.eval_batch_size = global_batch
    return config


# ---------------------------------------------------------------------------------------------
# The baseline: the same ResNet with plain BatchNorm, plain momentum SGD, the obvious DP step.


class PlainBatchNorm(nnx.Module):
    """Flax's `nnx.BatchNorm` behind `GroupedBatchNorm`'s constructor and call signature.

    Swapped into lbsgd's ResNet while it is built, so both models have the very same convs,
    FC, init and layer order; only the normalization differs: statistics over the whole batch
    the layer sees (in `shard_map`, one device's batch), one row of running statistics.
    """

    def __init__(self, num_features: int, *, group_size: int, num_groups: int = 1,
                 momentum: float = 0.9, epsilon: float = 1e-5, zero_init: bool = False,
                 dtype=None):
        del group_size, num_groups  # a plain BN has no groups
        self.norm = nnx.BatchNorm(
            num_features, momentum=momentum, epsilon=epsilon, dtype=dtype,
            param_dtype=jnp.float32,
            scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
            rngs=nnx.Rngs(0))

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.norm(x, use_running_average=not train)


def build_baseline_model(model: str, num_classes: int, dtype: str, seed: int = 0) -> nnx.Module:
    with mock.patch.object(resnet, "GroupedBatchNorm", PlainBatchNorm):
        return models.create_model(model, num_classes=num_classes, dtype=dtype, seed=seed)


@flax.struct.dataclass
class BaselineState:
    params: dict
    batch_stats: dict  # replicated: every device holds the same running averages
    opt_state: optax.OptState


BASELINE_BN = ("per_device", "global")


def make_baseline(model: str, num_classes: int, dtype: str, global_batch: int, mesh: Mesh,
                  dataset: input_pipeline.Dataset, bn: str = "per_device",
                  abstract: bool = False):
    """(state, jitted step): data-parallel momentum SGD as one would first write it.

    With `abstract`, the state is only shapes and shardings (enough to lower and compile).

    bn="per_device" (the baseline): `shard_map` inside `jax.jit`; each device normalizes over
    its own batch, then gradients and the replicated running statistics are averaged with
    `pmean`, the classic pmap recipe.
    bn="global": plain `jax.jit` of the model on the batch-sharded global array. Written this
    way, BatchNorm normalizes over the whole global batch (synchronized BN): not the paper's
    semantics, shown by benchmarks/comm.py for what its communication costs.
    """
    if bn not in BASELINE_BN:
        raise ValueError(f"bn must be one of {BASELINE_BN}, got {bn!r}")
    lr = 0.1 * global_batch / 256  # the linear scaling rule, as a constant
    tx = optax.sgd(lr, momentum=0.9)
    graphdef = nnx.split(nnx.eval_shape(
        lambda: build_baseline_model(model, num_classes, dtype)))[0]
    compute_dtype = jnp.dtype(dtype)

    def init() -> BaselineState:
        _, params, stats = nnx.split(build_baseline_model(model, num_classes, dtype),
                                     nnx.Param, nnx.BatchStat)
        params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
        return BaselineState(params=params, batch_stats=stats, opt_state=tx.init(params))

    replicated = parallel.replicated(mesh)
    if abstract:
        state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            jax.eval_shape(init))
    else:
        state = jax.jit(init, out_shardings=replicated)()

    def sgd_step(state: BaselineState, images: jax.Array, labels: jax.Array, mean=None):
        """Forward, backward and update on the batch this code sees; `mean` averages across
        devices (pmean under shard_map; nothing to do under plain jit)."""
        mean = mean or (lambda tree: tree)
        x = train.normalize(images, dataset, compute_dtype)

        def loss_fn(params):
            net = nnx.merge(graphdef, params, state.batch_stats)
            logits = net(x, train=True)
            loss = train.cross_entropy(logits, labels).mean()
            return loss, (logits, nnx.to_pure_dict(nnx.state(net, nnx.BatchStat)))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        grads = mean(grads)
        # Replicated running statistics must agree on every device: average them too.
        stats = mean(stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": mean(loss),
                   "train_top1": mean(jnp.mean(jnp.argmax(logits, -1) == labels))}
        return BaselineState(params, stats, opt_state), metrics

    if bn == "per_device":
        data = PartitionSpec(parallel.DATA_AXIS)
        sharded = jax.shard_map(
            functools.partial(sgd_step,
                              mean=lambda tree: jax.lax.pmean(tree, parallel.DATA_AXIS)),
            mesh=mesh, in_specs=(PartitionSpec(), data, data),
            out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
    else:
        sharded = sgd_step

    def step(state: BaselineState, batch: dict):
        return sharded(state, batch["image"], batch["label"])

    batch_sharding = parallel.batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(replicated, batch_sharding),
                     out_shardings=(replicated, replicated), donate_argnums=0)
    return state, jitted


# ---------------------------------------------------------------------------------------------
# Measurement helpers.


def synthetic_batch(mesh: Mesh, global_batch: int, image_size: int, num_classes: int,
                    seed: int = 0) -> dict:
    """Random uint8 images and labels, created on the devices in the batch sharding."""
    sharding = parallel.batch_sharding(mesh)

    @functools.partial(jax.jit, out_shardings=sharding)
    def images(key):
        shape = (global_batch, image_size, image_size, 3)
        return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(jnp.uint8)

    @functools.partial(jax.jit, out_shardings=sharding)
    def labels(key):
        return jax.random.randint(key, (global_batch,), 0, num_classes, jnp.int32)

    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"image": images(k1), "label": labels(k2)}


def compile_step(step, state, batch) -> tuple[object, float]:
    """(compiled executable, seconds to trace, lower and compile it)."""
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return compiled, time.perf_counter() - start


def xla_flops(compiled) -> float | None:
    """FLOPs of one device's program per XLA's cost analysis (a dict, or [dict] in old JAX)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def xla_memory_bytes(compiled) -> int | None:
    """Bytes one device needs for the step by XLA's static analysis (args + outputs + temps)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def peak_memory_bytes(devices) -> int | None:
    """The largest peak_bytes_in_use over the devices, where the backend reports it."""
    peaks = []
    for device in devices:
        stats = device.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


class Timed:
    """A compiled step and its state, stepped and timed one step at a time."""

    def __init__(self, compiled, state, batch):
        self.compiled, self.state, self.batch = compiled, state, batch
        self.times: list[float] = []

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            self.state, metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            if record:
                self.times.append(time.perf_counter() - start)


def summary(times: list[float], global_batch: int, num_devices: int, flops: float | None,
            peak_tflops: float | None, compile_s: float) -> dict:
    median = statistics.median(times)
    images_per_sec = global_batch / median
    achieved = flops / median if flops else None  # per device
    mfu = achieved / (peak_tflops * 1e12) if achieved and peak_tflops else None
    return {
        "compile_s": compile_s,  # trace + lower + compile, the fastest of --compile_repeats
        "timed_steps": len(times),
        "step_time_median_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "images_per_sec": images_per_sec,
        "images_per_sec_per_device": images_per_sec / num_devices,
        "xla_flops_per_step_per_device": flops,
        "achieved_tflops_per_device": achieved / 1e12 if achieved else None,
        "mfu": mfu,
    }


def measure(args, model: str, image_size: int, per_device_batch: int, dtype: str,
            mesh: Mesh) -> dict:
    num_devices = mesh.size
    global_batch = per_device_batch * num_devices
    load_before = os.getloadavg()[0]
    config = lbsgd_config(model, image_size, global_batch, args.bn_group_size, dtype,
                          args.num_classes)
    ex = train.setup(config, mesh)
    leaves = jax.tree.leaves(ex.state.params)  # counted now: the state is donated below
    param_count = sum(x.size for x in leaves)
    param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    batch = synthetic_batch(mesh, global_batch, image_size, args.num_classes)
    devices = list(mesh.devices.flat)
    compile_s = {"lbsgd": [], "baseline": []}

    lb_compiled, seconds = compile_step(ex.train_step, ex.state, batch)
    compile_s["lbsgd"].append(seconds)
    lb = Timed(lb_compiled, ex.state, batch)
    lb.run(args.warmup_steps, record=False)
    lb_peak = peak_memory_bytes(devices)  # read before the baseline's state exists

    base_state, base_step = make_baseline(model, args.num_classes, dtype, global_batch, mesh,
                                          ex.dataset)
    bl_compiled, seconds = compile_step(base_step, base_state, batch)
    compile_s["baseline"].append(seconds)
    # The first compilation of a process also pays one-time start-up costs: compile both again
    # from a cleared cache in the other order, and report the faster of each step's times.
    for r in range(1, args.compile_repeats):
        jax.clear_caches()
        for name in ("baseline", "lbsgd") if r % 2 else ("lbsgd", "baseline"):
            if name == "lbsgd":
                lb_compiled, seconds = compile_step(ex.train_step, lb.state, batch)
            else:
                bl_compiled, seconds = compile_step(base_step, base_state, batch)
            compile_s[name].append(seconds)
    lb.compiled = lb_compiled
    bl = Timed(bl_compiled, base_state, batch)
    for timed in (lb, bl):
        timed.run(args.warmup_steps, record=False)

    # Alternate step by step (lbsgd, baseline, lbsgd, ...), flipping who goes first in every
    # other repetition, so that a neighbour's load on a shared machine hits both alike.
    for r in range(args.repeats):
        for _ in range(args.steps):
            for timed in (lb, bl) if r % 2 == 0 else (bl, lb):
                timed.run(1)

    lb_row = summary(lb.times, global_batch, num_devices, xla_flops(lb_compiled),
                     args.peak_tflops, min(compile_s["lbsgd"]))
    bl_row = summary(bl.times, global_batch, num_devices, xla_flops(bl_compiled),
                     args.peak_tflops, min(compile_s["baseline"]))
    lb_row["xla_memory_bytes_per_device"] = xla_memory_bytes(lb_compiled)
    bl_row["xla_memory_bytes_per_device"] = xla_memory_bytes(bl_compiled)
    # Peak device memory (null where the backend does not report it, e.g. CPU). lbsgd's is
    # read before the baseline exists; the baseline's would include lbsgd's state, so none.
    lb_row["peak_memory_bytes"] = lb_peak
    bl_row["peak_memory_bytes"] = None
    return {
        "benchmark": "train_step",
        "date": datetime.date.today().isoformat(),
        "model": model,
        "image_size": image_size,
        "per_device_batch": per_device_batch,
        "global_batch": global_batch,
        "bn_group_size": args.bn_group_size,
        "dtype": dtype,
        "num_classes": args.num_classes,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": num_devices,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "optax_version": optax.__version__,
        "param_count": param_count,
        "param_bytes": param_bytes,
        "flop_count": "xla_cost_analysis: compiled step, one device, multiply-add = 2 FLOPs",
        "peak_tflops": args.peak_tflops,
        "lbsgd": lb_row,
        "baseline": bl_row,
        # The host's 1-minute load average before and after: on a shared machine, what else ran.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "ratio_images_per_sec": lb_row["images_per_sec"] / bl_row["images_per_sec"],
        # Median over adjacent (lbsgd, baseline) step pairs of t_baseline / t_lbsgd: robust to
        # load that changes slowly, since both steps of a pair see about the same machine.
        "paired_ratio_median": statistics.median(
            b / a for a, b in zip(lb.times, bl.times, strict=True)),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["resnet18"],
                        help=f"one or more of {', '.join(models.MODEL_NAMES)}")
    parser.add_argument("--image_size", nargs="+", type=int, default=[32])
    parser.add_argument("--per_device_batch", nargs="+", type=int, default=[32])
    parser.add_argument("--bn_group_size", type=int, default=32,
                        help="lbsgd's n; must divide every --per_device_batch")
    parser.add_argument("--dtype", nargs="+", default=["float32"],
                        choices=["float32", "bfloat16"])
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps of each variant per repetition")
    parser.add_argument("--repeats", type=int, default=2,
                        help="repetitions; lbsgd and baseline steps alternate, and which goes "
                             "first flips every repetition")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--compile_repeats", type=int, default=2,
                        help="compilations of each step from a cleared cache; the fastest counts")
    parser.add_argument("--devices", type=int, default=None,
                        help="use the first N devices (default: all)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak TFLOP/s of one device for the dtype, for MFU")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    devices = jax.devices()
    if args.devices is not None:
        if not 1 <= args.devices <= len(devices):
            sys.exit(f"--devices {args.devices}: this host has {len(devices)} devices "
                     "(on CPU, simulate more with "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        devices = devices[:args.devices]
    mesh = parallel.make_mesh(devices)
    for model in args.model:
        for image_size in args.image_size:
            for per_device_batch in args.per_device_batch:
                for dtype in args.dtype:
                    row = measure(args, model, image_size, per_device_batch, dtype, mesh)
                    row["xla_flags"] = os.environ.get("XLA_FLAGS")
                    row["command"] = " ".join(["python", *sys.argv])
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
