"""Train-step throughput of lbsgd against a plain data-parallel baseline, as JSON lines.

Why: lbsgd's step is the paper's (Goyal et al. 2017, Sec. 2-3): BatchNorm per virtual worker of
n images with per-worker running statistics, weight decay masked off BN, the schedule inside
the step. This measures its cost against the step one would write first: the same ResNet with
Flax's BatchNorm over each device's batch, `optax.sgd(lr, momentum=0.9)`, `shard_map` inside
`jax.jit` with gradients and running statistics `pmean`-ed (benchmarks/README.md, section 1).
Both train on one batch of random pixels, on the devices; each step is timed alone
(dispatch to `block_until_ready`), after warm-up, and the two alternate so that a shared
machine's drift hits both alike. One JSON object per model x image size x batch x dtype:

    python -m benchmarks.train_step                    # CPU default: resnet18, 32 px, 32/device
    python -m benchmarks.train_step --per_device_batch 32 256 --steps 10 --repeats 2
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.train_step --devices 8
    python -m benchmarks.train_step --model resnet50 --image_size 224 --dtype bfloat16 \\
        --peak_tflops 989   # e.g. on an H100 (dense bf16 peak); MFU is null without a peak

FLOPs are XLA's count for one device's compiled step, a multiply-add = 2 FLOPs (the "4.1
GFLOPs" quoted for a 224-px ResNet-50 forward pass count multiply-adds); MFU = FLOPs / step
time / --peak_tflops.
"""

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from benchmarks import common
from lbsgd import models, parallel, train
from lbsgd.config import default_config


def lbsgd_config(args: argparse.Namespace, mesh):
    """The paper's recipe (lbsgd.config) for `args`' step on `mesh`, on synthetic data."""
    config = default_config()
    config.model, config.dtype, config.dataset = args.model, args.dtype, "synthetic"
    config.num_classes, config.image_size = args.num_classes, args.image_size
    config.global_batch_size = config.eval_batch_size = args.per_device_batch * mesh.size
    config.bn_group_size = args.bn_group_size
    return config


class PlainBatchNorm(nnx.BatchNorm):
    """Flax's BatchNorm as lbsgd's ResNet takes a norm: statistics over the whole batch the
    layer sees (one-pass variance), one row of running statistics."""

    def __init__(self, num_features: int, *, zero_init: bool = False, dtype=None):
        super().__init__(num_features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                         scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
                         rngs=nnx.Rngs(0))

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return super().__call__(x, use_running_average=not train)


def make_baseline(config, dataset, mesh, *, global_bn: bool = False):
    """(init, step), jitted: lbsgd's `train.train_step` function on its ResNet with
    `PlainBatchNorm`, momentum SGD at a constant lr, and the whole state replicated.

    The baseline runs in `shard_map`: each device normalizes over its own batch, and the
    gradients (before SGD), running statistics, loss and top-1 are `pmean`-ed. `global_bn`: plain
    `jax.jit` on the sharded batch, so BN normalizes over all of it (synchronized BN).
    """
    lr = 0.1 * config.global_batch_size / 256  # the linear scaling rule, as a constant
    mean = (lambda tree: tree) if global_bn else functools.partial(
        jax.lax.pmean, axis_name=parallel.DATA_AXIS)
    tx = optax.chain(optax.stateless(lambda grads, _: mean(grads)), optax.sgd(lr, momentum=0.9))
    model = functools.partial(
        models.create_model, config.model, num_classes=config.num_classes, seed=config.seed,
        in_channels=dataset.image_shape[-1], dtype=config.dtype,
        norm=functools.partial(PlainBatchNorm, dtype=jnp.dtype(config.dtype)))
    graphdef = nnx.split(nnx.eval_shape(model))[0]

    def init() -> train.TrainState:
        _, params, stats = nnx.split(model(), nnx.Param, nnx.BatchStat)
        params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                                opt_state=tx.init(params))

    def step(state: train.TrainState, batch: dict):
        state, metrics = train.train_step(state, batch, graphdef=graphdef, tx=tx,
                                          learning_rate_fn=lambda _: lr, dataset=dataset,
                                          dtype=jnp.dtype(config.dtype))
        # Replicated running statistics must agree on every device: average them too. Of the
        # metrics, keep loss and top-1 (XLA drops the computation of the others).
        metrics = {key: metrics[key] for key in ("loss", "train_top1")}
        return state.replace(batch_stats=mean(state.batch_stats)), mean(metrics)

    if not global_bn:
        step = jax.shard_map(step, mesh=mesh, out_specs=PartitionSpec(), check_vma=False,
                             in_specs=(PartitionSpec(), PartitionSpec(parallel.DATA_AXIS)))
    replicated = parallel.replicated(mesh)
    return (jax.jit(init, out_shardings=replicated),
            jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                    out_shardings=replicated, donate_argnums=0))


class Stepper:
    """A jitted train step with its own state and batch, compiled and run one step per call."""

    def __init__(self, step, state, batch):
        self.step, self.state, self.batch = step, state, batch
        self.compile_s: list[float] = []  # trace + lower + compile, each time
        self.times: list[float] = []  # of each timed step

    def compile(self) -> None:
        self.compiled, seconds = common.timed(
            lambda: self.step.lower(self.state, self.batch).compile())
        self.compile_s.append(seconds)

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batch)
        return self.state, metrics

    def summary(self, global_batch: int, num_devices: int, peak_tflops: float | None) -> dict:
        median = statistics.median(self.times)
        flops = xla_analysis(lambda: float(self.compiled.cost_analysis()["flops"]))
        achieved = flops / median if flops else None  # per device
        memory = xla_analysis(self.compiled.memory_analysis)
        return {
            "compile_s": min(self.compile_s),  # the fastest of --compile_repeats
            "timed_steps": len(self.times), "step_time_median_s": median,
            "step_time_min_s": min(self.times), "step_time_max_s": max(self.times),
            "images_per_sec": global_batch / median,
            "images_per_sec_per_device": global_batch / median / num_devices,
            "xla_flops_per_step_per_device": flops,
            "achieved_tflops_per_device": achieved / 1e12 if achieved else None,
            "mfu": achieved / (peak_tflops * 1e12) if achieved and peak_tflops else None,
            # What one device needs for the step by XLA's static analysis.
            "xla_memory_bytes_per_device": None if memory is None else int(
                memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
        }


def xla_analysis(read):
    """read() of the compiled program, or None where the backend does not implement it."""
    try:
        return read() or None
    except Exception:  # noqa: BLE001 - any backend's "not implemented"
        return None


def peak_memory_bytes(mesh) -> int | None:
    """The largest peak_bytes_in_use over the devices, where the backend reports it (not CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
    return max((int(p) for p in peaks if p is not None), default=None)


def compile_and_time(lbsgd: Stepper, baseline: Stepper, args) -> None:
    """Compile (again from a cleared cache, in the other order, --compile_repeats times: the
    first compilation of a process also pays one-time start-up costs), warm up, then time
    the steps alternately, flipping who goes first in every other repetition."""
    baseline.compile()
    for r in range(1, args.compile_repeats):
        jax.clear_caches()
        for stepper in (baseline, lbsgd) if r % 2 else (lbsgd, baseline):
            stepper.compile()
    for stepper in (lbsgd, baseline):
        common.time_each(stepper, args.warmup_steps)
    for r in range(args.repeats):
        for _ in range(args.steps):
            for stepper in (lbsgd, baseline) if r % 2 == 0 else (baseline, lbsgd):
                stepper.times += common.time_each(stepper, 1)


def measure(args: argparse.Namespace, mesh) -> dict:
    """One row: lbsgd's and the baseline's step for one model, size, batch and dtype."""
    load_before = common.load_average()
    ex = train.setup(lbsgd_config(args, mesh), mesh)
    batch = next(ex.train_batches())  # on the devices in the batch sharding, reused
    lbsgd = Stepper(ex.train_step, ex.init_state(), batch)
    params = common.param_size(lbsgd.state.params)  # counted now: a step donates the state
    lbsgd.compile()
    common.time_each(lbsgd, args.warmup_steps)
    lbsgd_peak = peak_memory_bytes(mesh)  # read before the baseline's state exists
    init, step = make_baseline(ex.config, ex.dataset, mesh)
    baseline = Stepper(step, init(), batch)
    compile_and_time(lbsgd, baseline, args)
    rows = {name: s.summary(ex.config.global_batch_size, mesh.size, args.peak_tflops)
            for name, s in (("lbsgd", lbsgd), ("baseline", baseline))}
    # Peak device memory: the baseline's would include lbsgd's state, so none.
    rows["lbsgd"]["peak_memory_bytes"], rows["baseline"]["peak_memory_bytes"] = lbsgd_peak, None
    return {
        "benchmark": "train_step", **common.step_fields(args),
        "global_batch": ex.config.global_batch_size, **params,
        "flop_count": "xla_cost_analysis: compiled step, one device, multiply-add = 2 FLOPs",
        "peak_tflops": args.peak_tflops, **rows,
        "ratio_images_per_sec": rows["lbsgd"]["images_per_sec"]
        / rows["baseline"]["images_per_sec"],
        # Median over adjacent (lbsgd, baseline) step pairs of t_baseline / t_lbsgd: robust to
        # load that changes slowly, since both steps of a pair see about the same machine.
        "paired_ratio_median": statistics.median(
            b / a for a, b in zip(lbsgd.times, baseline.times, strict=True)),
        **common.environment(list(mesh.devices.flat), load_before),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    common.add_step_arguments(parser, model="resnet18", image_size=32, many=True, devices=None)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps of each variant per repetition")
    parser.add_argument("--repeats", type=int, default=2,
                        help="repetitions; which variant steps first flips every repetition")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--compile_repeats", type=int, default=2,
                        help="compilations of each step from a cleared cache; the fastest counts")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak TFLOP/s of one device for the dtype, for MFU")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    mesh = common.mesh_of(args.devices)
    for one in common.combinations(args):
        print(json.dumps(measure(one, mesh)), flush=True)


if __name__ == "__main__":
    main()
