"""Tests of lbsgd.optim against values written out from the paper and independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lbsgd import input_pipeline, optim
from lbsgd.config import default_config

IMAGENET_TRAIN = 1_281_167


def make_config(**overrides):
    cfg = default_config()
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def lr_at(schedule, step):
    return float(schedule(step))


def optimizer(cfg, steps_per_epoch):
    """The optimizer of `cfg` built as a run builds it, around the run's one schedule."""
    return optim.make_optimizer(cfg, optim.learning_rate_schedule(cfg, steps_per_epoch))


# --- the linear scaling rule ------------------------------------------


def test_scaled_learning_rate_is_linear_in_kn():
    assert optim.scaled_learning_rate(0.1, 256) == pytest.approx(0.1)
    assert optim.scaled_learning_rate(0.1, 8192) == pytest.approx(3.2)
    assert optim.scaled_learning_rate(0.05, 1024) == pytest.approx(0.2)


# --- learning-rate schedule -----------------------------------------------------------------


def test_gradual_warmup_and_decay_kn8192():
    # Sec. 5.1 / Table 1: kn = 8k, eta = 0.1 * 32 = 3.2, 5 warmup epochs, x0.1 at 30, 60, 80.
    s = 156
    assert input_pipeline.steps_per_epoch(IMAGENET_TRAIN, 8192) == s
    schedule = optim.learning_rate_schedule(make_config(global_batch_size=8192), s)
    assert schedule(0).dtype == jnp.float32
    assert lr_at(schedule, 0) == np.float32(0.1)
    assert lr_at(schedule, 779) == np.float32(3.2)  # last warmup update uses exactly the target
    assert lr_at(schedule, 780) == np.float32(3.2)
    np.testing.assert_allclose(lr_at(schedule, 389), 0.1 + 3.1 * 389 / 779, rtol=1e-6)
    np.testing.assert_allclose(lr_at(schedule, 30 * s - 1), 3.2, rtol=1e-6)
    np.testing.assert_allclose(lr_at(schedule, 30 * s), 0.32, rtol=1e-6)
    np.testing.assert_allclose(lr_at(schedule, 60 * s - 1), 0.32, rtol=1e-6)
    np.testing.assert_allclose(lr_at(schedule, 60 * s), 0.032, rtol=1e-6)
    np.testing.assert_allclose(lr_at(schedule, 80 * s - 1), 0.032, rtol=1e-6)
    np.testing.assert_allclose(lr_at(schedule, 80 * s), 0.0032, rtol=1e-6)
    np.testing.assert_allclose(lr_at(schedule, 90 * s - 1), 0.0032, rtol=1e-6)


def test_gradual_warmup_increments_by_a_constant():
    schedule = optim.learning_rate_schedule(make_config(global_batch_size=8192), 156)
    lrs = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(800, dtype=jnp.int32)), np.float64)
    steps = np.diff(lrs[:780])
    np.testing.assert_allclose(steps, np.full(779, 3.1 / 779), rtol=1e-3)
    np.testing.assert_allclose(lrs[:780], 0.1 + 3.1 * np.arange(780) / 779, rtol=1e-6)
    np.testing.assert_array_equal(lrs[779:], np.float32(3.2))


def test_no_warmup_kn256():
    schedule = optim.learning_rate_schedule(make_config(warmup="none"), 5004)
    assert lr_at(schedule, 0) == np.float32(0.1)
    assert lr_at(schedule, 5004 * 30 - 1) == np.float32(0.1)
    np.testing.assert_allclose(lr_at(schedule, 5004 * 30), 0.01, rtol=1e-6)


def test_no_warmup_large_batch_starts_at_target():
    schedule = optim.learning_rate_schedule(make_config(warmup="none", global_batch_size=8192), 156)
    assert lr_at(schedule, 0) == np.float32(3.2)


def test_constant_warmup_kn8192():
    cfg = make_config(global_batch_size=8192, warmup="constant")
    schedule = optim.learning_rate_schedule(cfg, 156)
    assert lr_at(schedule, 0) == np.float32(0.1)
    assert lr_at(schedule, 779) == np.float32(0.1)
    assert lr_at(schedule, 780) == np.float32(3.2)
    np.testing.assert_allclose(lr_at(schedule, 30 * 156), 0.32, rtol=1e-6)


def test_demo_kn512_one_warmup_epoch():
    # 60,000 images at kn = 512: S = 117. The update at the end of epoch 1 uses 0.2.
    s = input_pipeline.steps_per_epoch(60_000, 512)
    assert s == 117
    cfg = make_config(global_batch_size=512, warmup_epochs=1.0, lr_decay_epochs=(3,))
    schedule = optim.learning_rate_schedule(cfg, s)
    lrs = np.asarray(jax.vmap(schedule)(jnp.arange(4 * s)), np.float64)
    assert lrs[0] == np.float32(0.1)
    assert lrs[s - 1] == np.float32(0.2)
    np.testing.assert_allclose(np.diff(lrs[:s]), 0.1 / (s - 1), rtol=1e-4)
    np.testing.assert_array_equal(lrs[s - 1 : 3 * s], np.float32(0.2))
    np.testing.assert_allclose(lrs[3 * s :], 0.02, rtol=1e-6)


@pytest.mark.parametrize("warmup_epochs", [0.5, 0.48])
def test_fractional_warmup_epochs(warmup_epochs):
    # W = round(0.5 * 10) = round(0.48 * 10) = 5: 0.1, then four equal steps up to 0.4 at t = 4.
    cfg = make_config(global_batch_size=1024, warmup_epochs=warmup_epochs)
    schedule = optim.learning_rate_schedule(cfg, 10)
    lrs = [lr_at(schedule, t) for t in range(7)]
    np.testing.assert_allclose(lrs, [0.1, 0.175, 0.25, 0.325, 0.4, 0.4, 0.4], rtol=1e-6)
    # W = round(1.5 * 10) = 15 with constant warmup.
    cfg = make_config(global_batch_size=1024, warmup_epochs=1.5, warmup="constant")
    schedule = optim.learning_rate_schedule(cfg, 10)
    assert lr_at(schedule, 14) == np.float32(0.1)
    assert lr_at(schedule, 15) == np.float32(0.4)


@pytest.mark.parametrize("warmup", ["gradual", "constant"])
def test_warmup_below_kn_256_never_exceeds_the_target(warmup):
    # kn = 64: target 0.1 x 64 / 256 = 0.025 < base_lr. Warmup starts from the smaller of the
    # two, so it is the target from step 0 (a ramp down from 0.1 would be 4x too fast).
    schedule = optim.learning_rate_schedule(make_config(global_batch_size=64, warmup=warmup), 10)
    lrs = [lr_at(schedule, t) for t in range(0, 60, 7)]
    np.testing.assert_allclose(lrs, 0.025, rtol=1e-6)


def test_warmup_of_one_step_has_no_ramp():
    cfg = make_config(global_batch_size=1024, warmup_epochs=0.1)  # W = 1
    schedule = optim.learning_rate_schedule(cfg, 10)
    assert lr_at(schedule, 0) == np.float32(0.4)


def test_schedule_under_jit_matches_python_ints():
    # XLA may fuse the ramp's arithmetic differently under jit: equal up to float32 rounding.
    cfg = make_config(global_batch_size=8192)
    schedule = optim.learning_rate_schedule(cfg, 156)
    jitted = jax.jit(schedule)
    for t in [0, 1, 400, 779, 780, 4679, 4680, 9360, 12480, 14039]:
        traced = jitted(jnp.int32(t))
        assert traced.dtype == jnp.float32
        np.testing.assert_allclose(float(traced), lr_at(schedule, t), rtol=2e-7, err_msg=t)


def test_invalid_warmup_raises():
    with pytest.raises(ValueError, match=r"config\.warmup.*gradual.*constant.*none.*'linear'"):
        optim.learning_rate_schedule(make_config(warmup="linear"), 10)


def test_invalid_momentum_form_raises():
    with pytest.raises(ValueError, match=r"config\.momentum_form.*eq9.*eq10.*'eq11'"):
        optimizer(make_config(momentum_form="eq11"), 10)


# --- weight-decay mask ----------------------------------------------------------------------


def tiny_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(3, 2)), dtype),
            "bias": jnp.asarray(rng.normal(size=(2,)) * 0.1, dtype),
        },
        "bn": {
            "gamma": jnp.asarray(1.0 + 0.1 * rng.normal(size=(2,)), dtype),
            "beta": jnp.asarray(0.1 * rng.normal(size=(2,)), dtype),
        },
    }


def test_weight_decay_mask_excludes_bn_coefficients():
    params = {
        "conv1": {"kernel": jnp.ones((3, 3))},
        "bn1": {"gamma": jnp.ones(3), "beta": jnp.zeros(3)},
        "block": {"fc": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}, "bn": {"gamma": jnp.ones(2)}},
    }
    assert optim.weight_decay_mask(params) == {
        "conv1": {"kernel": True},
        "bn1": {"gamma": False, "beta": False},
        "block": {"fc": {"kernel": True, "bias": True}, "bn": {"gamma": False}},
    }


def test_weight_decay_mask_on_nnx_state():
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(jnp.ones((2, 2)))
            self.gamma = nnx.Param(jnp.ones(2))
            self.beta = nnx.Param(jnp.zeros(2))

    _, state = nnx.split(Block(), nnx.Param)
    mask = optim.weight_decay_mask(state)
    assert mask["kernel"].get_value() is True
    assert mask["gamma"].get_value() is False
    assert mask["beta"].get_value() is False


def test_weight_decay_not_applied_to_masked_leaves():
    cfg = make_config(weight_decay=0.5, warmup="none")
    params = tiny_params()
    opt = optimizer(cfg, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["bn"]["gamma"], params["bn"]["gamma"])
    np.testing.assert_array_equal(new["bn"]["beta"], params["bn"]["beta"])
    for name in ("kernel", "bias"):
        expected = np.asarray(params["dense"][name]) * (1 - 0.1 * 0.5)
        np.testing.assert_allclose(new["dense"][name], expected, rtol=1e-6)


# --- momentum: eq. (9), eq. (10), and a NumPy reference -------------------------------------

# Tiny schedule crossing everything: S = 4, gradual warmup over 2 epochs (W = 8), lr 0.1 -> 0.2,
# x0.1 at epochs 3 and 5 (updates 12 and 20); 28 updates = 7 epochs.
TINY_S = 4
NUM_UPDATES = 28


def tiny_config(**overrides):
    fields = dict(
        global_batch_size=512,
        warmup_epochs=2.0,
        lr_decay_epochs=(3, 5),
        weight_decay=0.01,
    )
    fields.update(overrides)
    return make_config(**fields)


def tiny_batches(dtype):
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(NUM_UPDATES, 8, 3))
    ys = rng.normal(size=(NUM_UPDATES, 8, 2))
    return [(np.asarray(x, dtype), np.asarray(y, dtype)) for x, y in zip(xs, ys, strict=True)]


def loss_fn(params, x, y):
    hidden = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    out = hidden * params["bn"]["gamma"] + params["bn"]["beta"]
    return 0.5 * jnp.sum((out - y) ** 2) / x.shape[0]


def train(opt, params, batches):
    """Applies opt to real gradients of loss_fn; returns params and updates after every step."""

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    state = opt.init(params)
    history = []
    for x, y in batches:
        params, state, updates = step(params, state, x, y)
        history.append((params, updates))
    return history


def max_abs_diff(a, b):
    leaves = jax.tree.leaves(jax.tree.map(lambda u, v: np.max(np.abs(u - v)), a, b))
    return float(max(leaves))


def test_eq10_with_correction_equals_eq9_step_for_step():
    with jax.enable_x64(True):
        params = tiny_params(jnp.float64)
        batches = tiny_batches(np.float64)
        eq9 = train(optimizer(tiny_config(), TINY_S), params, batches)
        cfg10 = tiny_config(momentum_form="eq10", momentum_correction=True)
        eq10 = train(optimizer(cfg10, TINY_S), params, batches)
    assert eq9[-1][0]["dense"]["kernel"].dtype == jnp.float64
    for t, ((p9, _), (p10, _)) in enumerate(zip(eq9, eq10, strict=True)):
        jax.tree.map(
            lambda a, b, t=t: np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=t), p9, p10
        )
    # The run really moved the parameters, including the masked ones.
    assert max_abs_diff(eq9[-1][0], params) > 1e-2


def test_eq10_without_correction_differs_once_the_rate_changes():
    # Constant warmup: lr = 0.1 for the first 8 updates, then 0.2.
    w = 2 * TINY_S
    with jax.enable_x64(True):
        params = tiny_params(jnp.float64)
        batches = tiny_batches(np.float64)
        eq9 = train(optimizer(tiny_config(warmup="constant"), TINY_S), params, batches)
        cfg10 = tiny_config(warmup="constant", momentum_form="eq10", momentum_correction=False)
        eq10 = train(optimizer(cfg10, TINY_S), params, batches)
    for t in range(w):
        assert max_abs_diff(eq9[t][0], eq10[t][0]) < 1e-12, t
    # Update w is the first at 0.2; eq. (10) keeps 0.9 * v with v scaled by the old rate 0.1,
    # so its update is smaller by about half the momentum term.
    assert max_abs_diff(eq9[w][1], eq10[w][1]) > 1e-3
    assert max_abs_diff(eq9[-1][0], eq10[-1][0]) > 1e-3


def numpy_reference_eq9(params, batches, momentum, weight_decay):
    """Eq. (9) with weight decay in the gradient (Remark 1), written out in NumPy float64."""
    k, b = (np.asarray(params["dense"][n], np.float64) for n in ("kernel", "bias"))
    g_, be = (np.asarray(params["bn"][n], np.float64) for n in ("gamma", "beta"))
    u = [np.zeros_like(a) for a in (k, b, g_, be)]

    def lr(t):  # written out for tiny_config: 0.1 -> 0.2 over W = 8, x0.1 at 12 and 20
        warm = 0.1 + 0.1 * t / 7 if t < 7 else 0.2
        return warm * (0.1 if t >= 12 else 1.0) * (0.1 if t >= 20 else 1.0)

    history = []
    for t, (x, y) in enumerate(batches):
        hidden = x @ k + b
        d_out = (hidden * g_ + be - y) / x.shape[0]
        d_hidden = d_out * g_
        grads = [x.T @ d_hidden, d_hidden.sum(0), (d_out * hidden).sum(0), d_out.sum(0)]
        # Kernel and bias are decayed; BN's gamma and beta are not (Sec. 5.1).
        grads[0] = grads[0] + weight_decay * k
        grads[1] = grads[1] + weight_decay * b
        u = [momentum * ui + gi for ui, gi in zip(u, grads, strict=True)]
        steps = [-lr(t) * ui for ui in u]
        k, b, g_, be = (p + s for p, s in zip((k, b, g_, be), steps, strict=True))
        history.append(((k, b, g_, be), steps))
    return history


def flat(tree):
    return (tree["dense"]["kernel"], tree["dense"]["bias"], tree["bn"]["gamma"], tree["bn"]["beta"])


@pytest.mark.parametrize("form", ["eq9", "eq10"])
def test_make_optimizer_matches_numpy_eq9_reference(form):
    cfg = tiny_config(momentum_form=form, weight_decay=0.05)
    params = tiny_params()
    batches = tiny_batches(np.float32)
    ours = train(optimizer(cfg, TINY_S), params, batches)
    ref = numpy_reference_eq9(
        params,
        [(np.float64(x), np.float64(y)) for x, y in batches],
        momentum=0.9,
        weight_decay=0.05,
    )
    for t, ((p, upd), (p_ref, upd_ref)) in enumerate(zip(ours, ref, strict=True)):
        for a, b in zip(flat(upd), upd_ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"update {t}")
        for a, b in zip(flat(p), p_ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"params {t}")


def test_weight_decay_mask_on_resnet50_spares_exactly_the_batchnorm_coefficients():
    """Sec. 5.1 decays every weight but BN's gamma and beta; counted from the architecture."""
    from flax import nnx

    from lbsgd import models

    model = nnx.eval_shape(lambda: models.create_model("resnet50", num_classes=1000))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = optim.weight_decay_mask(params)
    pairs = [(int(np.prod(p.shape)), m)
             for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)]
    decayed = sum(size for size, m in pairs if m)
    spared = sum(size for size, m in pairs if not m)

    # Every BN has C gammas and C betas. Stem: 64 channels. Each bottleneck stage (width w,
    # b blocks): BNs of w, w, 4w per block, plus 4w on the projection shortcut.
    stages = [(64, 3), (128, 4), (256, 6), (512, 3)]
    bn_channels = 64 + sum(b * (w + w + 4 * w) + 4 * w for w, b in stages)
    assert spared == 2 * bn_channels == 53_120
    assert decayed + spared == 25_557_032
    # The FC bias is not a BN coefficient: it is decayed, as every non-BN parameter.
    assert mask["fc"]["bias"] and mask["fc"]["kernel"]
