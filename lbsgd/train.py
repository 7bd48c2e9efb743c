"""State, the pure sharded train and eval steps, setup() of a run, and the training loop.

The train step is one `jax.jit` over the whole global batch with explicit shardings: the batch
and the BN groups split over the mesh, parameters and optimizer state replicated. XLA inserts
the gradient all-reduce; BatchNorm stays local to each group (see models/norm.py), so the
only collective of the step is the one the paper has too.
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from lbsgd import checkpoints, input_pipeline, models, noise_scale, optim, parallel
from lbsgd import config as config_lib
from lbsgd import workdir as workdir_lib
from lbsgd.datasets import Dataset, load_dataset
from lbsgd.errors import DivergenceError, Interrupted
from lbsgd.metrics import MetricsLogger, format_seconds


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of updates applied; the schedule's input
    params: dict
    batch_stats: dict  # per-worker running averages, one row per BN group (models/norm.py)
    opt_state: optax.OptState


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def normalize(images: jax.Array, dataset: Dataset, dtype: Any) -> jax.Array:
    """uint8 pixels -> per-channel standardized values, on the device."""
    mean = jnp.asarray(dataset.mean, jnp.float32)
    std = jnp.asarray(dataset.std, jnp.float32)
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def build_model(config: ml_collections.ConfigDict, dataset: Dataset,
                batch_size: int | None = None) -> nnx.Module:
    """The config's model for training batches of `batch_size` images (default kn); its
    BatchNorm keeps one row of statistics per virtual worker of the batch."""
    batch_size = batch_size or config.global_batch_size
    norm = models.grouped_norm(group_size=config.bn_group_size,
                               num_groups=batch_size // config.bn_group_size,
                               momentum=config.bn_momentum, dtype=config.dtype)
    return models.create_model(config.model, num_classes=config.num_classes,
                               in_channels=dataset.image_shape[-1], norm=norm,
                               dtype=config.dtype, seed=config.seed)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """Replicate everything but the per-worker BN statistics, which live with their group."""
    replicated = parallel.replicated(mesh)
    return TrainState(
        step=replicated,
        params=jax.tree.map(lambda _: replicated, state.params),
        batch_stats=jax.tree.map(lambda _: parallel.batch_sharding(mesh), state.batch_stats),
        opt_state=jax.tree.map(lambda _: replicated, state.opt_state),
    )


def make_init(config: ml_collections.ConfigDict, dataset: Dataset,
              tx: optax.GradientTransformation,
              mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, Callable[[], TrainState]]:
    """(graphdef, shardings, init): `init()` creates a fresh state directly in its shardings
    (one jit), never gathered on one device."""
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config, dataset)))[0]

    def init() -> TrainState:
        _, params, stats = nnx.split(build_model(config, dataset), nnx.Param, nnx.BatchStat)
        params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                          opt_state=tx.init(params))

    shardings = state_shardings(jax.eval_shape(init), mesh)
    return graphdef, shardings, jax.jit(init, out_shardings=shardings)


def _loss_and_grads(graphdef: nnx.GraphDef, params: dict, batch_stats: dict,
                    images: jax.Array, labels: jax.Array):
    """(mean loss, correct count, updated BN rows, gradient) of one batch of whole BN groups."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(images, train=True)
        loss = cross_entropy(logits, labels).mean()
        return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, jnp.sum(jnp.argmax(logits, axis=-1) == labels), new_stats, grads


def _per_worker_loss_and_grads(graphdef: nnx.GraphDef, params: dict, batch_stats: dict,
                               images: jax.Array, labels: jax.Array, group_size: int):
    """`_loss_and_grads` of a batch of whole BN groups, from each group's own gradient g_j:
    (mean loss, correct count, updated BN rows, mean_j g_j, sum_j |g_j|^2).

    `graphdef` is the model for ONE group (one row of statistics); `jax.vmap` runs it over
    the groups. Each group's loss is the mean over its n images, so the mean over groups of
    the g_j is the gradient `_loss_and_grads` returns (Remark 3): the probe computes the
    same update. Holds groups x parameters of float32 gradients at once
    (`probe_microbatches` bounds the groups per call)."""
    groups = labels.shape[0] // group_size

    def split(x):  # [groups * size, ...] -> [groups, size, ...]
        return x.reshape(groups, -1, *x.shape[1:])

    def one_worker(stats, images, labels):  # stats: this group's rows, [1, C] each
        return _loss_and_grads(graphdef, params, stats, images, labels)

    losses, correct, stats, grads = jax.vmap(one_worker)(
        jax.tree.map(split, batch_stats), split(images), split(labels))
    squares = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
    return (jnp.mean(losses), jnp.sum(correct),
            jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), stats),
            jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), squares)


def train_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, learning_rate_fn: Callable,
               dataset: Dataset, dtype: Any, mesh: Mesh, microbatches: int = 1,
               reduce_dtype: Any = jnp.float32,
               probe_group_size: int = 0) -> tuple[TrainState, dict]:
    """One SGD update on the global batch: a pure function of (state, batch).

    Each device computes the gradient of its own rows (whole BN groups: BatchNorm needs
    nothing from other devices), and one all-reduce (`psum`) sums the devices' gradients,
    the only communication of the step. With `microbatches` M > 1 each device takes its rows
    in M slices of whole groups (`graphdef` is built for one slice) and sums their gradients
    before that one all-reduce: BatchNorm is per worker, so each slice's loss, gradient and
    statistics rows are exactly those of its groups in the whole batch, the same function in
    1/M of the activation memory. The slices are an unrolled Python loop: a `lax.scan` was
    ~10x slower on XLA:CPU. The all-reduce sends the gradients in `reduce_dtype` (float32,
    the paper's arithmetic; bfloat16 halves the bytes) and the update is computed in float32.

    With `probe_group_size` n > 0 (a probed step of the noise scale, lbsgd/noise_scale.py;
    `graphdef` is then the model of ONE group) each slice takes each worker's gradient g_j
    on its own (`_per_worker_loss_and_grads`), and the metrics add S_small = mean_j |g_j|^2
    over all kn/n workers and S_big = |mean_j g_j|^2 of the data gradient (before weight
    decay), in float32. The update is the same; sum_j |g_j|^2 rides in the one all-reduce.
    """
    kn = batch["label"].shape[0]

    def device_part(params, batch_stats, images, labels):
        def piece(x, m):
            return x.reshape(microbatches, -1, *x.shape[1:])[m]

        def part(m):
            args = (graphdef, params, jax.tree.map(lambda x: piece(x, m), batch_stats),
                    piece(images, m), piece(labels, m))
            if probe_group_size:
                return _per_worker_loss_and_grads(*args, probe_group_size)
            return _loss_and_grads(*args)

        losses, correct, stats, grads, *squares = zip(*map(part, range(microbatches)),
                                                      strict=True)
        # Remark 3: the loss is summed over all kn images and divided by kn (not by n). Each
        # part's mean covers kn / (devices x M) images, so the global mean is the sum of the
        # parts' means over devices x M.
        parts_in_all = mesh.size * microbatches
        summed = jax.tree.map(lambda *g: sum(g).astype(reduce_dtype), *grads)
        total = jax.lax.psum((sum(losses), summed, sum(correct), *map(sum, squares)),
                             parallel.DATA_AXIS)
        loss = total[0] / parts_in_all
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) / parts_in_all, total[1])
        batch_stats = jax.tree.map(lambda *rows: jnp.concatenate(rows), *stats)
        return loss, grads, total[2] / kn, batch_stats, total[3:]

    # check_vma=False: the parameters enter replicated, and JAX's check of varying axes would
    # make their backward pass all-reduce every gradient as it is computed (once per
    # microbatch); the one psum above is the step's reduction instead.
    rows, whole = PartitionSpec(parallel.DATA_AXIS), PartitionSpec()
    loss, grads, top1, batch_stats, squares = jax.shard_map(
        device_part, mesh=mesh, in_specs=(whole, rows, rows, rows),
        out_specs=(whole, whole, whole, rows, whole), check_vma=False)(
        state.params, state.batch_stats, normalize(batch["image"], dataset, dtype),
        batch["label"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {
        "loss": loss,
        "train_top1": top1,
        "lr": learning_rate_fn(state.step),  # the rate this update used
        "grad_norm": optax.tree.norm(grads),  # also catches an Inf gradient of a finite loss
    }
    if probe_group_size:  # McCandlish et al. 2018, App. A: B_small = n, B_big = kn
        metrics["s_small"] = squares[0] / (kn // probe_group_size)
        metrics["s_big"] = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
              dataset: Dataset, dtype: Any) -> dict:
    """Sums over the real (unmasked) images of one padded evaluation batch."""
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    logits = model(normalize(batch["image"], dataset, dtype), train=False)
    labels, mask = batch["label"], batch["mask"]
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(cross_entropy(logits, labels) * mask),
        "top1": jnp.sum((top5[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run derives from its config, built once (also used by tests, benchmarks)."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    dataset: Dataset
    steps_per_epoch: int  # floor(N / kn)
    total_steps: int
    learning_rate_fn: Callable  # the one schedule: the optimizer's and the metrics' `lr`
    init_state: Callable[[], TrainState]  # a fresh state, created in its shardings
    train_step: Callable  # jitted (state, global batch) -> (state, metrics); donates state
    eval_step: Callable  # jitted (state, padded global batch) -> sums
    # train_step's twin for the noise scale's probed steps (metrics add s_small, s_big);
    # None when noise_scale_every_steps is 0, and then nothing else differs.
    probe_step: Callable | None = None

    def train_batches(self, start_step: int = 0):
        """Every global training batch from `start_step` on (Remark 4)."""
        return input_pipeline.train_batches(
            self.dataset, self.mesh, global_batch_size=self.config.global_batch_size,
            seed=self.config.seed, start_step=start_step)


def setup(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Experiment:
    """Validate `config` on `mesh` (all devices by default) and build the run's pieces."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    config_lib.validate(config, num_devices=mesh.size)
    dataset = load_dataset(config)
    steps_per_epoch = input_pipeline.steps_per_epoch(len(dataset.train), config.global_batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    learning_rate_fn = optim.learning_rate_schedule(config, steps_per_epoch)
    tx = optim.make_optimizer(config, learning_rate_fn)
    graphdef, shardings, init_state = make_init(config, dataset, tx, mesh)
    microbatch = config.microbatch_size or config.global_batch_size
    # The train step's model sees one device's share of one microbatch.
    step_graphdef = nnx.split(nnx.eval_shape(
        lambda: build_model(config, dataset, microbatch // mesh.size)))[0]
    # Explicit shardings (pjit semantics, no pmap): XLA inserts the gradient all-reduce.
    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    dtype = jnp.dtype(config.dtype)
    step_fn = functools.partial(train_step, tx=tx, learning_rate_fn=learning_rate_fn,
                                dataset=dataset, dtype=dtype, mesh=mesh,
                                reduce_dtype=jnp.dtype(config.grad_reduce_dtype))
    train_fn = jax.jit(
        functools.partial(step_fn, graphdef=step_graphdef,
                          microbatches=config.global_batch_size // microbatch),
        in_shardings=(shardings, batch), out_shardings=(shardings, replicated),
        donate_argnums=0)
    probe_fn = None
    if config.noise_scale_every_steps:
        param_count = sum(x.size for x in jax.tree.leaves(jax.eval_shape(init_state).params))
        # The probe's model is one BN worker's, vmapped over the groups of a slice.
        group_graphdef = nnx.split(nnx.eval_shape(
            lambda: build_model(config, dataset, config.bn_group_size)))[0]
        probe_fn = jax.jit(
            functools.partial(step_fn, graphdef=group_graphdef,
                              probe_group_size=config.bn_group_size,
                              microbatches=probe_microbatches(config, mesh.size, param_count)),
            in_shardings=(shardings, batch), out_shardings=(shardings, replicated),
            donate_argnums=0)
    eval_fn = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, dataset=dataset, dtype=dtype),
        in_shardings=(shardings, batch), out_shardings=replicated)
    return Experiment(config, mesh, dataset, steps_per_epoch, total_steps, learning_rate_fn,
                      init_state, train_fn, eval_fn, probe_fn)


# What the per-worker gradients of a probed step may hold at once on a device, beyond the
# plain step: they are (groups of a slice) x (parameters) float32 numbers.
PROBE_GRADIENT_BYTES = 1 << 30


def _devices(count: int) -> str:
    return f"{count} device{'s' if count != 1 else ''}"


def probe_microbatches(config: ml_collections.ConfigDict, num_devices: int,
                       param_count: int) -> int:
    """Slices per device of a probed step: the plain step's, split further until a slice's
    per-worker gradients fit PROBE_GRADIENT_BYTES (at least one worker per slice). Per-worker
    BN makes any split into whole groups the same function (as for microbatch_size)."""
    groups = config.global_batch_size // (config.bn_group_size * num_devices)  # per device
    microbatch = config.microbatch_size or config.global_batch_size
    per_slice = microbatch // (config.bn_group_size * num_devices)  # the plain step's
    most = max(1, PROBE_GRADIENT_BYTES // (4 * param_count))  # float32 gradients
    return groups // max(d for d in range(1, per_slice + 1) if per_slice % d == 0 and d <= most)


def evaluate(ex: Experiment, state: TrainState) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over every evaluation image exactly once."""
    totals = None
    for batch in input_pipeline.eval_batches(ex.dataset, ex.mesh,
                                             batch_size=ex.config.eval_batch_size):
        sums = ex.eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"eval_loss": float(totals["loss"]) / count, "eval_top1": float(totals["top1"]) / count,
            "eval_top5": float(totals["top5"]) / count}


def _read_step(step: int, metrics: dict) -> dict[str, float]:
    """Fetch one step's metrics (waiting for that step only) and refuse non-finite ones."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
        raise DivergenceError(
            f"training diverged at step {step} (lr {values['lr']:.6g}): loss {values['loss']}, "
            f"gradient norm {values['grad_norm']}. Nothing from this step on was saved; the "
            "last good checkpoint is intact. Lower base_lr or lengthen warmup_epochs.")
    return values


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train, resuming from the latest checkpoint in `workdir`, evaluating every epoch; the
    workdir is checked and locked first, so two runs can never share it (lbsgd/workdir.py)."""
    workdir_lib.check_paths(workdir, config.data_dir)
    with workdir_lib.WorkdirLock(workdir):
        return _train(config, workdir)


EVAL_KEYS = ("eval_top1", "eval_top5", "eval_loss")


def eval_row(workdir: str, step: int) -> dict[str, float] | None:
    """The evaluation of `step` in the workdir's metrics.jsonl (whose rows MetricsLogger
    checked as it opened the file), or None."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    found = [r for r in rows if r["step"] == step and "eval_top1" in r]
    return {k: found[-1][k] for k in EVAL_KEYS} if found else None


def last_train_row(path: str, step: int) -> dict | None:
    """The last train row at or before `step` of a metrics.jsonl (None if none)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    found = [r for r in rows if r["step"] <= step and "loss" in r]
    return found[-1] if found else None


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Set up, resume, then train the steps left (or finish a finished run)."""
    started = time.perf_counter()
    ex = setup(config)
    with contextlib.ExitStack() as closing:  # closed in reverse, each even if one fails
        ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
        # Whatever happened, saves already started complete.
        closing.callback(ckpt.close)
        state = ckpt.restore_latest(ex.init_state(), config)
        workdir_lib.warn_if_short_of_space(workdir, state)
        start_step = int(state.step)
        logger = MetricsLogger(workdir, config, total_steps=ex.total_steps,
                               steps_per_epoch=ex.steps_per_epoch, start_step=start_step)
        closing.callback(logger.close)
        best = checkpoints.BestCheckpoint(workdir)
        closing.callback(best.close)
        logging.info("JAX %s, process %d of %d, %s: %d train images, %d steps per "
                     "epoch (floor(N / kn) = floor(%d / %d)), %d steps in all, starting at "
                     "step %d", jax.__version__, jax.process_index(), jax.process_count(),
                     _devices(ex.mesh.size), len(ex.dataset.train), ex.steps_per_epoch,
                     len(ex.dataset.train), config.global_batch_size, ex.total_steps,
                     start_step)
        # A run stopped after its checkpoint's evaluation was written, before that evaluation
        # was offered as the best, catches up here.
        evaluation = eval_row(workdir, start_step)
        if evaluation is not None:
            best.offer(start_step, state, config, evaluation, latest=ckpt)
        if start_step >= ex.total_steps:
            _finished(ex, state, start_step, evaluation, logger, best, ckpt)
            return state
        try:
            state = _loop(ex, state, start_step, logger, best, ckpt)
        except Interrupted:  # Ctrl-C: its checkpoint is saved; say what this sitting did
            ckpt.wait()
            _summary(workdir, logger.last_step, start_step, time.perf_counter() - started,
                     logger, finished=False)
            raise
        ckpt.wait()
        _summary(workdir, int(state.step), start_step, time.perf_counter() - started, logger,
                 finished=int(state.step) == ex.total_steps)
        return state


def _summary(workdir: str, step: int, start_step: int, seconds: float,
             logger: MetricsLogger, *, finished: bool) -> None:
    """The end-of-run line (process 0): final and best evaluation (from metrics.jsonl, so a
    resumed run counts the evaluations before its restart), steps, time, throughput, outputs;
    "stopped" instead of "done" when a signal ended the run before its last step."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if "eval_top1" in r]
    if evals:
        top = max(evals, key=lambda r: r["eval_top1"])
        accuracy = (f"{'final' if finished else 'last'} eval top1 "
                    f"{evals[-1]['eval_top1']:.4f} at step {evals[-1]['step']}"
                    f", best {top['eval_top1']:.4f} at step {top['step']}")
    else:
        accuracy = "no evaluation"
    rate = logger.mean_images_per_sec
    logging.info("%s: %s | trained steps %d to %d (%d steps) in %s wall time | %s img/s "
                 "over train steps | outputs in %s: checkpoints/, metrics.jsonl, config.json, "
                 "run.json", "done" if finished else "stopped (rerun the same command to "
                 "resume)", accuracy, start_step + 1, step, step - start_step,
                 format_seconds(seconds), "n/a" if rate is None else f"{rate:.0f}",
                 os.path.abspath(workdir))


def _finished(ex: Experiment, state: TrainState, step: int, evaluation: dict | None,
              logger: MetricsLogger, best: checkpoints.BestCheckpoint,
              ckpt: checkpoints.Checkpointer) -> None:
    """A rerun of a finished run trains nothing: it says so, with the final evaluation, and
    evaluates the last checkpoint again if metrics.jsonl lost that evaluation. (The loop
    writes a step's evaluation before its save, but a crash can still lose the row: a torn
    last line is dropped on start-up, and rows are not fsynced.)"""
    if evaluation is not None:
        logging.info("already finished at step %d: eval top1 %.4f | top5 %.4f | loss %.4f "
                     "(metrics.jsonl); nothing to train", step, evaluation["eval_top1"],
                     evaluation["eval_top5"], evaluation["eval_loss"])
        return
    logging.info("already finished at step %d, but metrics.jsonl has no evaluation of that "
                 "step (lost in a crash?): evaluating it now", step)
    evaluation = evaluate(ex, state)
    logger.write_eval(step, evaluation)
    best.offer(step, state, ex.config, evaluation, latest=ckpt)


class StepProfiler:
    """config.profile_steps "START:END": a jax.profiler trace of those train steps, written to
    WORKDIR/profile (TensorBoard's profile tab reads it; Perfetto reads its trace.json.gz).
    Steps are dispatched asynchronously, so the trace ends once step END has finished."""

    def __init__(self, spec: str, workdir: str):
        self.steps = config_lib.profile_step_range(spec)
        self.directory = os.path.join(workdir, "profile")
        self.tracing = False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def after(self, step: int, state: TrainState) -> None:
        if self.tracing and (step == self.steps[1]):
            self.stop(state)

    def stop(self, state: TrainState) -> None:
        """End the trace (at step END, or when the loop ends first)."""
        if self.tracing:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.tracing = False
            logging.info("profile of train steps %d to %d written to %s (TensorBoard's "
                         "profile tab, or Perfetto)", *self.steps, self.directory)


def _loop(ex: Experiment, state: TrainState, start_step: int, logger: MetricsLogger,
          best: checkpoints.BestCheckpoint, ckpt: checkpoints.Checkpointer) -> TrainState:
    """The loop.

    Every step's metrics are read one step late, after the next step is dispatched, so the
    device never waits for the host; they are checked for divergence at every step, and a
    step's rows are written before its checkpoint, so a rerun after a crash rewrites exactly
    the rows after the checkpoint it resumes from.
    """
    config, total_steps, steps_per_epoch = ex.config, ex.total_steps, ex.steps_per_epoch
    window = []  # the values of the steps read since the last train row
    data_wait = [0.0]  # seconds spent waiting for input batches since the last train row
    probe_every = config.noise_scale_every_steps
    # The noise scale's running averages continue from the last train row the resume kept.
    noise = noise_scale.RunningEstimate(small=config.bn_group_size,
                                        big=config.global_batch_size,
                                        population=len(ex.dataset.train))
    noise.resume_from(last_train_row(logger.path, start_step) if probe_every else None)

    def finish(step: int, metrics: dict) -> None:
        values = _read_step(step, metrics)
        if "s_small" in values:  # a probed step
            noise.add(values.pop("s_small"), values.pop("s_big"))
        window.append(values)
        if step % config.log_every_steps == 0 or step == total_steps:
            # loss and train_top1: means over the logging window; lr, grad_norm: this step's;
            # the noise scale's parts: running averages over the probed steps so far.
            for key in ("loss", "train_top1"):
                values[key] = sum(v[key] for v in window) / len(window)
            window.clear()
            logger.write_train(step, {**values, **noise.columns()},
                               data_wait_seconds=data_wait[0])
            data_wait[0] = 0.0

    def next_batch() -> dict:
        waited_from = time.perf_counter()
        batch = next(batches)
        data_wait[0] += time.perf_counter() - waited_from
        return batch

    batches = ex.train_batches(start_step)
    first = next(batches)  # _train calls the loop only with steps left
    logging.info("compiling the train step for %s ...", _devices(ex.mesh.size))
    compile_start = time.perf_counter()
    train_step = ex.train_step.lower(state, first).compile()
    probe_step = ex.probe_step and ex.probe_step.lower(state, first).compile()
    logging.info("compiled the train step%s in %.1f s",
                 f" and the noise-scale probe (every {probe_every} steps)" if probe_every else "",
                 time.perf_counter() - compile_start)
    logger.restart_clock(start_step)
    batches = itertools.chain([first], batches)
    unread = None  # (step, metrics) dispatched but not yet read
    profiler = StepProfiler(config.profile_steps, os.path.dirname(logger.path))
    with checkpoints.PreemptionWatch() as preemption:
        for step in range(start_step + 1, total_steps + 1):  # `step`: updates done after it
            profiler.before(step)
            probed = probe_every and step % probe_every == 0
            state, metrics = (probe_step if probed else train_step)(state, next_batch())
            profiler.after(step, state)
            if unread is not None:
                finish(*unread)
            unread = (step, metrics)
            end_of_epoch = step % steps_per_epoch == 0
            last = step == total_steps
            preempted = preemption.reached(step)
            evaluate_now = last or (end_of_epoch and
                                    (step // steps_per_epoch) % config.eval_every_epochs == 0)
            save_now = (last or end_of_epoch or preempted
                        or step % config.checkpoint_every_steps == 0)
            if evaluate_now or save_now:
                finish(*unread)
                unread = None
            if evaluate_now:
                evaluation = evaluate(ex, state)
                logger.write_eval(step, evaluation)
            if save_now:
                ckpt.save(step, state, config)
            if evaluate_now:  # every evaluated step is saved: the best follows its save
                best.offer(step, state, config, evaluation, latest=ckpt)
            if evaluate_now or save_now:  # not train time: out of the next row's img/s
                logger.restart_clock(step)
            if preempted and preemption.interrupted:
                raise Interrupted(f"interrupted: saved the checkpoint at step {step}; "
                                  "rerun the same command to resume")
            if preempted:
                logging.warning("preempted: saved the checkpoint at step %d; rerun the "
                                "same command to resume", step)
                break
    profiler.stop(state)
    return state
