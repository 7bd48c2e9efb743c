"""Train-step throughput of lbsgd against the plain data-parallel step, as one JSON object.

Why: what the paper's recipe (per-worker BatchNorm and running statistics, weight decay masked
off BN, the schedule in the step) costs against the step one would write first: Flax's
BatchNorm, `optax.sgd` and `pmean` in `shard_map`. benchmarks/README.md, section 1, has the
method and the results.

    python -m benchmarks.train_step                    # CPU default: resnet18, 32 px, 32/device
    python -m benchmarks.train_step --model resnet50 --image_size 224 --dtype bfloat16 \\
        --peak_tflops 989   # e.g. an H100's dense bf16 peak; MFU is null without a peak
"""

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from benchmarks import common
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


class Stepper:
    """A jitted step with its own state on the shared batch; a call runs one step."""

    def __init__(self, step, state, batch):
        self.step, self.state, self.batch = step, state, batch
        self.compile_s, self.times = [], []  # each compilation's, each timed step's seconds

    def compile(self) -> None:
        start = time.perf_counter()  # trace + lower + compile
        self.compiled = self.step.lower(self.state, self.batch).compile()
        self.compile_s.append(time.perf_counter() - start)

    def __call__(self) -> float:
        """One step's seconds until its arrays are ready: JAX dispatches asynchronously."""
        start = time.perf_counter()
        self.state, _ = jax.block_until_ready(self.compiled(self.state, self.batch))
        return time.perf_counter() - start

    def summary(self, images: int, devices: int, peak_tflops: float | None) -> dict:
        median = statistics.median(self.times)
        # XLA's static analysis of one device's program; None where the backend has none.
        flops = (self.compiled.cost_analysis() or {}).get("flops") or None
        memory = self.compiled.memory_analysis()
        return {
            "compile_s": min(self.compile_s), "timed_steps": len(self.times),
            "step_time_median_s": median, "step_time_min_s": min(self.times),
            "step_time_max_s": max(self.times), "images_per_sec": images / median,
            "images_per_sec_per_device": images / median / devices,
            "xla_flops_per_step_per_device": flops,
            "achieved_tflops_per_device": flops / median / 1e12 if flops else None,
            "mfu": flops / median / (peak_tflops * 1e12) if flops and peak_tflops else None,
            "xla_memory_bytes_per_device": None if memory is None else int(
                memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
        }


def measure(args) -> dict:
    ex, batch = common.experiment(args)
    lbsgd = Stepper(ex.train_step, ex.init_state(), batch)
    params = common.param_size(lbsgd.state.params)  # counted now: a step donates the state
    lbsgd.compile()
    for _ in range(args.warmup_steps):
        lbsgd()
    # Peak memory where the backend reports it (not CPU), read before the baseline's state
    # exists; the baseline's would include lbsgd's state, so it gets none.
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in ex.mesh.devices.flat]
    peak = max((int(p) for p in peaks if p is not None), default=None)
    init, step = make_baseline(ex)
    baseline = Stepper(step, init(), batch)
    baseline.compile()
    # A process's first compilation also pays start-up costs: compile again from a cleared
    # cache, in turns; compile_s is the fastest.
    for r in range(1, args.compile_repeats):
        jax.clear_caches()
        for stepper in (baseline, lbsgd) if r % 2 else (lbsgd, baseline):
            stepper.compile()
    for stepper in (lbsgd, baseline):
        for _ in range(args.warmup_steps):
            stepper()
    # Step by step, who goes first flipping every repetition: drift of a shared machine's load
    # hits both alike.
    for r in range(args.repeats):
        for _ in range(args.steps):
            for stepper in (lbsgd, baseline) if r % 2 == 0 else (baseline, lbsgd):
                stepper.times.append(stepper())
    kn = ex.config.global_batch_size
    rows = {name: {**s.summary(kn, ex.mesh.size, args.peak_tflops), "peak_memory_bytes": p}
            for name, s, p in (("lbsgd", lbsgd, peak), ("baseline", baseline, None))}
    return {
        "benchmark": "train_step", **{key: getattr(args, key) for key in common.STEP_FIELDS},
        "global_batch": kn, **params,
        "flop_count": "xla_cost_analysis: compiled step, one device, multiply-add = 2 FLOPs",
        "peak_tflops": args.peak_tflops, **rows,
        "ratio_images_per_sec": rows["lbsgd"]["images_per_sec"]
        / rows["baseline"]["images_per_sec"],
        # Median over adjacent step pairs of t_baseline / t_lbsgd: both steps of a pair see
        # about the same machine, so load that changes slowly cancels.
        "paired_ratio_median": statistics.median(
            b / a for a, b in zip(lbsgd.times, baseline.times, strict=True)),
        **common.environment(list(ex.mesh.devices.flat)),
    }


def main() -> None:
    parser = common.parser(__doc__)
    common.add_step_arguments(parser, model="resnet18", image_size=32, devices=None)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=2, help="who steps first flips in each")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--compile_repeats", type=int, default=2, help="the fastest counts")
    parser.add_argument("--peak_tflops", type=float, help="one device's, for the dtype: MFU")
    print(json.dumps(measure(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
