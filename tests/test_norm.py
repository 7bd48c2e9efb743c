"""GroupedBatchNorm vs independent float64 NumPy references (Goyal et al. Sec. 5.1).

Running statistics are per worker: `mean` and `var` are [num_groups, C], row g updated only
from group g; eval normalizes with the mean over rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lbsgd.models.norm import GroupedBatchNorm, grouped_moments

EPS = 1e-5
# Cross-device ops, as spelled in StableHLO (lowered) and in HLO (compiled) text.
COLLECTIVES = (
    "all_reduce", "all-reduce", "all_gather", "all-gather", "reduce_scatter", "reduce-scatter",
    "all_to_all", "all-to-all", "collective_permute", "collective-permute", "psum",
)  # fmt: skip


def _np_group_stats(x, group_size):
    """Per-group (mean, biased var) over all axes but channel: lists of [C] float64 arrays."""
    x = np.asarray(x, np.float64)
    means, vars_ = [], []
    for start in range(0, x.shape[0], group_size):
        xs = x[start : start + group_size].reshape(-1, x.shape[-1])
        means.append(xs.mean(axis=0))
        vars_.append(((xs - xs.mean(axis=0)) ** 2).mean(axis=0))
    return means, vars_


def _np_forward(x, group_size, gamma, beta):
    x = np.asarray(x, np.float64)
    y = np.empty_like(x)
    means, vars_ = _np_group_stats(x, group_size)
    for i, (mu, var) in enumerate(zip(means, vars_, strict=True)):
        sl = slice(i * group_size, (i + 1) * group_size)
        y[sl] = (x[sl] - mu) / np.sqrt(var + EPS) * gamma + beta
    return y


def _np_backward(x, dy, group_size, gamma):
    """Closed-form BN backward, independently per group and channel."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    c = x.shape[-1]
    dx = np.empty_like(x)
    dgamma, dbeta = np.zeros(c), np.zeros(c)
    for start in range(0, x.shape[0], group_size):
        sl = slice(start, start + group_size)
        xs, dys = x[sl].reshape(-1, c), dy[sl].reshape(-1, c)
        n = xs.shape[0]
        sigma = np.sqrt(xs.var(axis=0) + EPS)
        xhat = (xs - xs.mean(axis=0)) / sigma
        sum_dy, sum_dy_xhat = dys.sum(axis=0), (dys * xhat).sum(axis=0)
        dxs = gamma / (sigma * n) * (n * dys - sum_dy - xhat * sum_dy_xhat)
        dx[sl] = dxs.reshape(x[sl].shape)
        dgamma += sum_dy_xhat
        dbeta += sum_dy
    return dx, dgamma, dbeta


def _random_bn(c, group_size, seed=0, **kwargs):
    """A BN with non-trivial gamma/beta so the affine part is actually tested."""
    bn = GroupedBatchNorm(c, group_size=group_size, **kwargs)
    rng = np.random.default_rng(seed)
    bn.gamma[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    bn.beta[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
    return bn


def _input(shape, seed=1):
    rng = np.random.default_rng(seed)
    # Per-channel offsets/scales, and different per example, so groups differ.
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, shape[-1]) + rng.normal(size=shape[-1])
    return x.astype(np.float32)


def _train_step():
    return nnx.jit(lambda bn, x: bn(x, train=True))


@pytest.mark.parametrize("shape,group_size", [((12, 5, 4, 3), 4), ((16, 6), 4), ((6, 3, 3, 2), 2)])
def test_train_forward_matches_numpy(shape, group_size):
    bn = _random_bn(shape[-1], group_size, num_groups=shape[0] // group_size)
    x = _input(shape)
    y = bn(jnp.asarray(x), train=True)
    ref = _np_forward(x, group_size, np.asarray(bn.gamma[...]), np.asarray(bn.beta[...]))
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


def test_grouped_moments_matches_numpy():
    x = _input((8, 3, 3, 5))
    mean, var = grouped_moments(jnp.asarray(x), 2)
    ref_mean, ref_var = _np_group_stats(x, 2)
    assert mean.shape == var.shape == (4, 5)
    np.testing.assert_allclose(np.asarray(mean), np.stack(ref_mean), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var), np.stack(ref_var), rtol=1e-4, atol=1e-5)


def _large_mean_input(shape, dtype, seed=0):
    """|mean| / std ~ 1e3 and beyond, where the naive E[x^2] - E[x]^2 cancels in float32.

    float32: mean 1e4 (per channel 1e4 and -2e4 ...), std 0.1. bfloat16 keeps 8 significant
    bits, so its values cannot spread by much less than |mean| / 256: the case is sparse, a
    value M = 9984 and, for 1% of the values, the next bf16 value up, M + 64 (std ~6.4).
    Returned as float32 holding exactly the values of `dtype`.
    """
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        offsets = 1e4 * np.array([1.0, -2.0, 1.5, 3.0])[: shape[-1]]
        return (offsets + 0.1 * rng.normal(size=shape)).astype(np.float32)
    x = (9984.0 + 64.0 * (rng.random(shape) < 0.01)).astype(np.float32)
    assert np.array_equal(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), x)
    return x


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_pass_moments_are_exact_with_a_shift_near_the_mean(dtype):
    # One pass, var = E[d^2] - E[d]^2 with d = x - shift: with the shift GroupedBatchNorm uses,
    # a worker's running mean, here one lagging the data by 3 std per group and channel, it
    # matches float64; with no shift (the naive formula) it is far off, so this test fails
    # for a formulation that does not shift, or shifts by something far from the mean.
    x = _large_mean_input((4, 32, 32, 2), dtype)
    ref_mean, ref_var = (np.stack(s) for s in _np_group_stats(x, 2))
    assert np.all(np.abs(ref_mean) / np.sqrt(ref_var) > 1e3)
    xj = jnp.asarray(x, dtype)
    _, naive_var = grouped_moments(xj, 2)
    naive_error = np.max(np.abs(np.asarray(naive_var) - ref_var) / ref_var)
    assert naive_error > 1e-2, naive_error
    running_mean = ref_mean + 3.0 * np.sqrt(ref_var)
    mean, var = grouped_moments(xj, 2, shift=jnp.asarray(running_mean, jnp.float32))
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(var), ref_var, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-7)  # |mean| >> std
    # The shift changes the rounding only: a per-channel [C] one and a shift of 0 on data
    # near zero mean both give float64's statistics.
    mean_c, var_c = grouped_moments(xj, 2, shift=jnp.asarray(running_mean[0], jnp.float32))
    np.testing.assert_allclose(np.asarray(var_c), ref_var, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(mean_c), ref_mean, rtol=1e-7)


def test_running_mean_shift_follows_the_data():
    # The shift is each worker's running mean: 0 at initialization (the naive formula), then
    # mean[g] <- m * mean[g] + (1 - m) * mean_g closes its gap to a steady data mean by the
    # factor m every step. On data of mean 1e4 and std 0.1 the first step's variance is far
    # off (the rows start far from the data: not a ResNet's case, whose BN inputs start near
    # zero mean); once the rows have followed the data, it is float64's.
    m, g, groups, c = 0.9, 4, 2, 2
    bn = _random_bn(c, group_size=g, num_groups=groups, momentum=m)
    gamma, beta = np.asarray(bn.gamma[...]), np.asarray(bn.beta[...])
    step = _train_step()
    gaps, var_errors, out_errors = [], [], []
    for seed in range(150):
        x = _large_mean_input((g * groups, 4, 4, c), "float32", seed=seed)
        means, vars_ = (np.stack(s) for s in _np_group_stats(x, g))
        gaps.append(np.max(np.abs(np.asarray(bn.mean[...]) - means)))
        var_before = np.asarray(bn.var[...], np.float64)
        y = np.asarray(step(bn, jnp.asarray(x)))
        var = (np.asarray(bn.var[...], np.float64) - m * var_before) / (1 - m)  # this step's
        var_errors.append(np.max(np.abs(var - vars_) / vars_))
        out_errors.append(np.max(np.abs(y - _np_forward(x, g, gamma, beta))))
    # |row - group mean| <= m^k x the largest |mean| (2e4), up to the data's noise: geometric.
    np.testing.assert_array_less(gaps, 2e4 * m ** np.arange(len(gaps)) + 0.1)
    assert var_errors[0] > 1.0 and out_errors[0] > 1.0  # shift 0: |mean| / std = 1e5
    np.testing.assert_array_less(var_errors[100:], 1e-4)  # float64's variance, step after step
    # The output x * a + b rounds at the scale of |x * a| ~ 3e5 (a float32 ulp is 0.03): the
    # two-pass formulation's x - mean rounded likewise (0.04 here).
    np.testing.assert_array_less(out_errors[100:], 0.05)


def test_first_steps_from_zero_running_mean_are_exact():
    # At initialization the rows are 0, so the first step is the naive formula: exact for
    # data near zero mean against its std, as a ResNet's BN inputs are at the start (|mean| /
    # std here up to ~3). The second step shifts by the updated rows.
    g, groups, c = 4, 2, 3
    bn = GroupedBatchNorm(c, group_size=g, num_groups=groups, momentum=0.9)
    step = _train_step()
    for seed in (1, 2):
        x = _input((g * groups, 5, 5, c), seed=seed)
        shift = np.asarray(bn.mean[...])
        var_before = np.asarray(bn.var[...])
        y = np.asarray(step(bn, jnp.asarray(x)))
        _, ref_var = _np_group_stats(x, g)
        var = (np.asarray(bn.var[...]) - 0.9 * var_before) / 0.1
        np.testing.assert_allclose(var, np.stack(ref_var), rtol=1e-5)
        np.testing.assert_allclose(y, _np_forward(x, g, np.ones(c), np.zeros(c)), atol=2e-5)
    assert np.all(shift != 0)  # the second step did shift


def _two_pass_forward(x, gamma, beta, group_size):
    """The formulation before the one-pass statistics: mean, then mean((x - mean)^2)."""
    xg = x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:]).astype(jnp.float32)
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    y = (xg - mean) * jax.lax.rsqrt(var + EPS) * gamma + beta
    return y.reshape(x.shape)


@pytest.mark.parametrize("shift", ["zero", "running_mean", "far"])
def test_one_pass_gradients_equal_two_pass_gradients(shift):
    # Gradients flow through the statistics (BN's backward includes them). The one-pass
    # function is the two-pass one for every shift, so autodiff must give the same gradients
    # to float32 rounding: with shift 0 (initialization), with running-mean rows near the
    # groups' means, and with rows 5 std away from them.
    shape, g = (8, 4, 4, 3), 2
    bn = _random_bn(shape[-1], group_size=g, num_groups=shape[0] // g)
    x = _input(shape) + np.float32(4.0)  # |mean| / std up to ~10
    means = np.stack(_np_group_stats(x, g)[0])
    stds = np.sqrt(np.stack(_np_group_stats(x, g)[1]))
    rows = {"zero": 0 * means, "running_mean": means + 0.1 * stds, "far": means - 5 * stds}
    bn.mean[...] = jnp.asarray(rows[shift], jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)

    def loss(bn, x):
        return jnp.sum(bn(x, train=True) * w)

    def loss_two_pass(gamma, beta, x):
        return jnp.sum(_two_pass_forward(x, gamma, beta, g) * w)

    bn_grads, dx = nnx.grad(loss, argnums=(0, 1))(nnx.clone(bn), jnp.asarray(x))
    ref = jax.grad(loss_two_pass, argnums=(0, 1, 2))(bn.gamma[...], bn.beta[...], jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ref[2]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn_grads["gamma"][...]), ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn_grads["beta"][...]), ref[1], rtol=1e-6, atol=1e-6)
    assert set(nnx.state(bn_grads).keys()) == {"gamma", "beta"}  # nothing into the rows


@pytest.mark.parametrize("shape,group_size", [((8, 3, 2, 4), 2), ((12, 5), 3)])
def test_gradients_match_closed_form(shape, group_size):
    bn = _random_bn(shape[-1], group_size, num_groups=shape[0] // group_size)
    x = _input(shape)
    w = np.random.default_rng(2).normal(size=shape).astype(np.float32)

    def loss(bn, x):
        return jnp.sum(bn(x, train=True) * w)

    grads, dx = nnx.grad(loss, argnums=(0, 1))(bn, jnp.asarray(x))
    gamma = np.asarray(bn.gamma[...], np.float64)
    ref_dx, ref_dgamma, ref_dbeta = _np_backward(x, w, group_size, gamma)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["gamma"][...]), ref_dgamma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["beta"][...]), ref_dbeta, rtol=1e-4, atol=1e-4)


def test_running_stats_update_one_and_two_steps():
    # Row g follows group g only: mean[g] <- m * mean[g] + (1 - m) * mean_g (same for var).
    m, g, groups, c = 0.8, 3, 3, 4
    bn = GroupedBatchNorm(c, group_size=g, num_groups=groups, momentum=m)
    step = _train_step()
    ref_mean, ref_var = np.zeros((groups, c)), np.ones((groups, c))
    for seed in (1, 2):
        x = _input((g * groups, 2, 2, c), seed=seed)
        step(bn, jnp.asarray(x))
        means, vars_ = _np_group_stats(x, g)
        ref_mean = m * ref_mean + (1 - m) * np.stack(means)
        ref_var = m * ref_var + (1 - m) * np.stack(vars_)
        assert bn.mean[...].shape == bn.var[...].shape == (groups, c)
        assert bn.mean[...].dtype == bn.var[...].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(bn.mean[...]), ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(bn.var[...]), ref_var, rtol=1e-5, atol=1e-6)
    # The rows really are different, so a shared (averaged) update would have failed above.
    assert not np.allclose(ref_mean[0], ref_mean[1], rtol=1e-2)
    assert not np.allclose(ref_var[0], ref_var[1], rtol=1e-2)


def test_eval_uses_mean_over_rows_and_does_not_update_them():
    groups, c = 4, 3
    bn = _random_bn(c, group_size=2, num_groups=groups)
    rng = np.random.default_rng(3)
    run_mean, run_var = rng.normal(size=(groups, c)), rng.uniform(0.2, 3.0, (groups, c))
    bn.mean[...] = jnp.asarray(run_mean, jnp.float32)
    bn.var[...] = jnp.asarray(run_var, jnp.float32)
    x = _input((5, 4, 4, c))  # eval takes any batch size: neither group_size nor num_groups
    y = bn(jnp.asarray(x), train=False)
    gamma, beta = np.asarray(bn.gamma[...]), np.asarray(bn.beta[...])
    # Average of the workers' means and of their variances (every worker counts equally).
    ref = (x - run_mean.mean(axis=0)) / np.sqrt(run_var.mean(axis=0) + EPS) * gamma + beta
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), run_mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), run_var, rtol=1e-6)


def test_row_average_equals_running_average_of_group_averages():
    # Linearity: after several steps, the mean over rows of the per-worker running averages
    # is the single running average of the group-averaged statistics.
    m, g, groups, c = 0.9, 2, 4, 3
    bn = _random_bn(c, group_size=g, num_groups=groups, momentum=m)
    step = _train_step()
    avg_mean, avg_var = np.zeros(c), np.ones(c)
    for seed in range(10, 16):
        x = _input((g * groups, 3, 3, c), seed=seed)
        step(bn, jnp.asarray(x))
        means, vars_ = _np_group_stats(x, g)
        avg_mean = m * avg_mean + (1 - m) * np.mean(means, axis=0)
        avg_var = m * avg_var + (1 - m) * np.mean(vars_, axis=0)
    rows_mean, rows_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    np.testing.assert_allclose(rows_mean.mean(axis=0), avg_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows_var.mean(axis=0), avg_var, rtol=1e-5, atol=1e-6)
    assert not np.allclose(rows_mean, rows_mean[0], rtol=1e-2)  # the rows themselves differ
    # So eval normalizes exactly with that single running average.
    x = _input((3, 2, 2, c), seed=20)
    gamma, beta = np.asarray(bn.gamma[...]), np.asarray(bn.beta[...])
    ref = (x - avg_mean) / np.sqrt(avg_var + EPS) * gamma + beta
    np.testing.assert_allclose(
        np.asarray(bn(jnp.asarray(x), train=False)), ref, rtol=1e-4, atol=1e-5
    )


def test_groups_are_independent():
    # Changing one group's examples changes only that group's outputs and statistics row.
    x = _input((6, 4, 4, 3))
    x2 = x.copy()
    x2[2:4] = x2[2:4] * 5.0 + 7.0  # change only the middle group
    bn, bn2 = (_random_bn(3, group_size=2, num_groups=3) for _ in range(2))
    y = np.asarray(bn(jnp.asarray(x), train=True))
    y2 = np.asarray(bn2(jnp.asarray(x2), train=True))
    np.testing.assert_array_equal(y[:2], y2[:2])
    np.testing.assert_array_equal(y[4:], y2[4:])
    assert not np.allclose(y[2:4], y2[2:4])
    for stat, stat2 in ((bn.mean, bn2.mean), (bn.var, bn2.var)):
        a, b = np.asarray(stat[...]), np.asarray(stat2[...])
        np.testing.assert_array_equal(a[[0, 2]], b[[0, 2]])
        assert not np.allclose(a[1], b[1])


def test_full_group_is_ordinary_batchnorm():
    shape = (8, 3, 3, 4)
    bn = _random_bn(shape[-1], group_size=shape[0])  # one worker: num_groups = 1
    x = _input(shape)
    y = bn(jnp.asarray(x), train=True)
    xs = x.astype(np.float64)
    mu, var = xs.mean(axis=(0, 1, 2)), xs.var(axis=(0, 1, 2))
    ref = (xs - mu) / np.sqrt(var + EPS) * np.asarray(bn.gamma[...]) + np.asarray(bn.beta[...])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    assert bn.mean[...].shape == bn.var[...].shape == (1, 4)
    np.testing.assert_allclose(np.asarray(bn.mean[...])[0], 0.1 * mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...])[0], 0.9 + 0.1 * var, rtol=1e-5)


def test_bfloat16_input_keeps_float32_statistics():
    bn = _random_bn(4, group_size=2, num_groups=2)
    x = _input((4, 3, 3, 4))
    y = bn(jnp.asarray(x, jnp.bfloat16), train=True)
    assert y.dtype == jnp.bfloat16
    assert bn.mean[...].dtype == bn.var[...].dtype == jnp.float32
    assert bn.gamma[...].dtype == bn.beta[...].dtype == jnp.float32
    ref = _np_forward(x, 2, np.asarray(bn.gamma[...]), np.asarray(bn.beta[...]))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=5e-2, atol=5e-2)


def test_dtype_argument_sets_output_dtype():
    bn = GroupedBatchNorm(2, group_size=2, num_groups=2, dtype=jnp.bfloat16)
    x = jnp.asarray(_input((4, 2)))
    assert bn(x, train=True).dtype == jnp.bfloat16
    assert bn(x, train=False).dtype == jnp.bfloat16


def test_zero_init_and_param_names():
    bn = GroupedBatchNorm(3, group_size=2, num_groups=5, zero_init=True)
    params = nnx.state(bn, nnx.Param)
    stats = nnx.state(bn, nnx.BatchStat)
    assert set(params.keys()) == {"gamma", "beta"}
    assert set(stats.keys()) == {"mean", "var"}
    assert bn.gamma[...].shape == bn.beta[...].shape == (3,)
    np.testing.assert_array_equal(np.asarray(bn.gamma[...]), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(bn.mean[...]), np.zeros((5, 3)))
    np.testing.assert_array_equal(np.asarray(bn.var[...]), np.ones((5, 3)))
    default = GroupedBatchNorm(3, group_size=1)
    np.testing.assert_array_equal(np.asarray(default.gamma[...]), 1.0)
    assert default.mean[...].shape == default.var[...].shape == (1, 3)  # num_groups = 1


@pytest.mark.parametrize("batch", [6, 4, 12])
def test_wrong_training_batch_raises(batch):
    # Train mode needs exactly group_size * num_groups = 8 examples: not 6 (not divisible),
    # not 4 or 12 (divisible, but a different number of workers than there are rows).
    bn = GroupedBatchNorm(3, group_size=4, num_groups=2)
    with pytest.raises(ValueError, match=rf"^training batch of {batch} examples.*bn_group_size 4"):
        bn(jnp.zeros((batch, 2, 2, 3)), train=True)
    assert bn(jnp.zeros((batch, 2, 2, 3)), train=False).shape == (batch, 2, 2, 3)


def test_bad_group_size_raises():
    with pytest.raises(ValueError, match=r"batch size 6 .*bn_group_size 4"):
        grouped_moments(jnp.zeros((6, 2, 2, 3)), 4)
    with pytest.raises(ValueError, match="bn_group_size must be positive"):
        GroupedBatchNorm(3, group_size=0)


def _split_fn(bn, train):
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def f(params, stats, x):
        model = nnx.merge(graphdef, params, stats)
        y = model(x, train=train)
        return y, nnx.state(model, nnx.BatchStat)

    return f, params, stats


def test_no_collectives_under_jit():
    # Purely local: the lowered computation must not contain any cross-device op.
    f, params, stats = _split_fn(GroupedBatchNorm(3, group_size=2, num_groups=2), train=True)
    text = jax.jit(f).lower(params, stats, jnp.zeros((4, 2, 2, 3))).as_text()
    for op in COLLECTIVES:
        assert op not in text


def test_no_collectives_when_sharded_over_devices():
    # The batch and the statistics rows sharded on their leading axis, as in the train step:
    # after SPMD partitioning every group and its row sit on one device, so a training
    # forward compiles to no communication at all.
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several devices (tests/conftest.py simulates 8)")
    mesh = Mesh(np.array(devices), ("data",))
    split, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    groups = 2 * len(devices)  # two workers per device
    bn = GroupedBatchNorm(3, group_size=2, num_groups=groups)
    x = jax.device_put(jnp.zeros((2 * groups, 2, 2, 3)), split)

    def compiled_text(train):
        f, params, stats = _split_fn(bn, train)
        params, stats = jax.device_put(params, whole), jax.device_put(stats, split)
        jitted = jax.jit(f, out_shardings=(split, split))
        return jitted.lower(params, stats, x).compile().as_text()

    text = compiled_text(train=True)
    for op in COLLECTIVES:
        assert op not in text, op
    # Control: eval averages the rows across devices, which does need an all-reduce, so the
    # check above would have seen communication had there been any.
    assert any(op in compiled_text(train=False) for op in COLLECTIVES)
