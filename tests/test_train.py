"""The sharded train step: hardware invariance, a per-worker reference, and its communication."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lbsgd import config as config_lib
from lbsgd import hlo, models, parallel, train
from tests.helpers import tiny_config


def _run(config, devices, steps):
    """Losses and final state of `steps` updates on a mesh over `devices`."""
    ex = train.setup(config, parallel.make_mesh(devices))
    state, batches, losses = ex.init_state(), ex.train_batches(), []
    for _ in range(steps):
        state, metrics = ex.train_step(state, next(batches))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state)


def test_one_device_and_eight_devices_train_the_same_function():
    # Gradual warmup from base 0.1 up to kn/256 * 0.1 with kn = 512 changes the rate each step.
    config = tiny_config(global_batch_size=512, bn_group_size=32, warmup="gradual")
    losses_1, state_1 = _run(config, jax.devices()[:1], steps=4)
    losses_8, state_8 = _run(config, jax.devices(), steps=4)
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(losses_1, losses_8, rtol=2e-5)
    assert losses_1[-1] < losses_1[0]  # it trains: the comparison is not between two no-ops
    for tree in ("params", "batch_stats", "opt_state"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                     getattr(state_1, tree), getattr(state_8, tree))


def _worker_loss_and_stats(graphdef, params, stats, images, labels):
    model = nnx.merge(graphdef, params, stats)
    logits = model(images, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def test_train_step_equals_a_loop_over_workers():
    """Sec. 2/3: k workers of n images, each with its own BN, gradients averaged over workers."""
    config = tiny_config(warmup="none", weight_decay=1e-3)
    ex = train.setup(config, parallel.make_mesh(jax.devices()[:1]))
    state = ex.init_state()
    state0 = jax.device_get(state)
    batch = jax.device_get(next(ex.train_batches()))
    new_state, metrics = ex.train_step(state, batch)

    n, k = config.bn_group_size, config.global_batch_size // config.bn_group_size
    worker_model = models.create_model(config.model, num_classes=10, in_channels=1,
                                       norm=models.grouped_norm(group_size=n))
    graphdef = nnx.split(worker_model)[0]
    images = train.normalize(jnp.asarray(batch["image"]), ex.dataset, jnp.float32)
    losses, grads, stats = [], [], []
    for w in range(k):
        rows = slice(w * n, (w + 1) * n)
        stats_w = jax.tree.map(lambda x, w=w: jnp.asarray(x[w:w + 1]), state0.batch_stats)
        (loss, new_stats), grad = jax.value_and_grad(_worker_loss_and_stats, argnums=1,
                                                     has_aux=True)(
            graphdef, state0.params, stats_w, images[rows], batch["label"][rows])
        losses.append(loss)
        grads.append(grad)
        stats.append(new_stats)

    # Remark 3: the loss over kn images divided by kn is the mean of the workers' means.
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)
    # One step of eq. (9) from zero momentum: w - lr * (g + lambda * w), no decay on BN gamma/beta.
    lr = 0.1 * config.global_batch_size / 256

    def expected(path, w, *worker_grads):
        decay = config.weight_decay * w if path[-1].key not in ("gamma", "beta") else 0.0
        return w - lr * (np.mean(worker_grads, axis=0) + decay)

    reference = jax.tree_util.tree_map_with_path(expected, state0.params, *grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(new_state.params), reference)
    # Each worker's running statistics come from its own images only.
    reference_stats = jax.tree.map(lambda *rows: np.concatenate(rows), *stats)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(new_state.batch_stats), reference_stats)


def test_a_bfloat16_gradient_reduction_rounds_the_gradients_only():
    """grad_reduce_dtype=bfloat16: the update is the float32 one up to bf16's rounding of the
    summed gradients (8 significant bits: relative error <= 2^-8 per element), not equal."""
    config = tiny_config(global_batch_size=128, warmup="none", weight_decay=0.0)
    exact = _run(config, jax.devices(), steps=1)[1]
    config.grad_reduce_dtype = "bfloat16"
    rounded = _run(config, jax.devices(), steps=1)[1]
    # The first update is -lr * gradient (zero momentum buffer): compare the parameter changes.
    before = train.setup(config, parallel.make_mesh()).init_state().params
    step = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), exact.params, before)
    step_rounded = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), rounded.params,
                                before)
    flat, flat_rounded = (np.concatenate([x.ravel() for x in jax.tree.leaves(t)])
                          for t in (step, step_rounded))
    assert not np.array_equal(flat, flat_rounded)
    # 8 devices' bf16 partial sums, each rounded once, then summed (in bf16 on the wire):
    # a few ulps of bf16 relative to the largest part; here bounded by 4 * 2^-8 of the scale.
    np.testing.assert_allclose(flat_rounded, flat, atol=4 * 2**-8 * np.abs(flat).max())


@pytest.mark.parametrize("devices", [1, 8])
def test_gradient_accumulation_is_the_same_step(devices):
    """Per-worker BN makes microbatches of whole groups independent: accumulating 2 of them is
    the whole step (loss, top-1, every parameter, every worker's BN row, the optimizer)."""
    config = tiny_config(global_batch_size=128, bn_group_size=8, warmup="none")
    whole = _run(config, jax.devices()[:devices], steps=2)
    config.microbatch_size = 64
    accumulated = _run(config, jax.devices()[:devices], steps=2)
    np.testing.assert_allclose(accumulated[0], whole[0], rtol=1e-6)
    for tree in ("params", "batch_stats", "opt_state"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     getattr(accumulated[1], tree), getattr(whole[1], tree))
    assert not np.allclose(whole[1].batch_stats["stem_bn"]["mean"][0],
                           whole[1].batch_stats["stem_bn"]["mean"][-1])  # rows differ


def test_microbatch_size_that_does_not_divide_names_the_fix():
    config = tiny_config(global_batch_size=256, bn_group_size=8, microbatch_size=96)
    with pytest.raises(config_lib.ConfigError, match=r"microbatch_size 96 must be a multiple of "
                       r"bn_group_size 8 x 8 devices \(= 64\) that divides global_batch_size "
                       r"256: use one of \[64, 128, 256\], or 0"):
        config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize("dtype, microbatch_size", [("float32", 0), ("bfloat16", 0),
                                                     ("float32", 64)])
def test_only_collective_is_the_gradient_all_reduce(dtype, microbatch_size):
    """BN costs no communication: the 8-device step all-reduces the gradients once (also when
    it accumulates microbatches), in float32, and nothing else. (A bfloat16 reduction is
    checked in the GPU program, tests/test_gpu_program.py: XLA:CPU sums every bf16
    all-reduce in f32, so the CPU program cannot show it.)"""
    config = tiny_config(dtype=dtype, global_batch_size=128, microbatch_size=microbatch_size)
    ex = train.setup(config, parallel.make_mesh())
    batch = next(ex.train_batches())
    collectives = hlo.parse_collectives(
        ex.train_step.lower(ex.init_state(), batch).compile().as_text())

    assert {c["op"] for c in collectives} == {"all-reduce"}, collectives
    tensors = [t for c in collectives for t in c["tensors"]]
    reduced = collections.Counter(tuple(t["shape"]) for t in tensors if t["shape"])
    params = ex.init_state().params
    gradients = collections.Counter(tuple(x.shape) for x in jax.tree.leaves(params))
    assert not reduced - gradients  # nothing but gradients, none twice (once per microbatch)
    assert {t["dtype"] for t in tensors if t["shape"]} == {"f32"}
    # XLA reduces equal gradients once: a projection shortcut's BN beta gets exactly the
    # gradient of the block's last BN beta (both are added into the block's output).
    shortcut_betas = collections.Counter(
        tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)
        if "shortcut" in jax.tree_util.keystr(path) and path[-1].key == "beta")
    assert gradients - reduced == shortcut_betas
    # Besides the gradients only the scalar loss and top-1 sums cross devices.
    assert len([t for t in tensors if not t["shape"]]) <= 2
