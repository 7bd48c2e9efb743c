"""The gradient noise scale (lbsgd/noise_scale.py, McCandlish et al. 2018, App. A): the
estimator against closed forms and sampled regression problems, and its running average."""

import numpy as np
import pytest

from lbsgd import noise_scale


def _parts(per_example: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """S_small, S_big of steps of per-example gradients [steps, kn, d] in workers of n."""
    steps, kn, d = per_example.shape
    workers = per_example.reshape(steps, kn // n, n, d).mean(axis=2)  # g_j
    s_small = np.sum(workers ** 2, axis=-1).mean(axis=-1)
    s_big = np.sum(workers.mean(axis=1) ** 2, axis=-1)
    return s_small, s_big


def _averaged(s_small, s_big, *, n, kn, population):
    """The per-step estimates averaged (plainly, to test their bias), then the ratio."""
    parts = np.array([noise_scale.step_estimates(a, b, small=n, big=kn, population=population)
                      for a, b in zip(s_small, s_big, strict=True)])
    grad_squared, trace = parts.mean(axis=0)
    return grad_squared, trace, trace / grad_squared


def test_linear_regression_with_known_covariance():
    """Least squares 0.5 (x.w - y)^2 with x ~ N(0, I_d), y = x.w* + N(0, s^2), fresh examples
    at every step: at w = w* + delta the per-example gradient x (x.delta - eps) has G = delta
    and (Isserlis) Sigma = delta delta^T + (|delta|^2 + s^2) I, so
    B_simple = ((d + 1) |delta|^2 + d s^2) / |delta|^2. 4000 steps of 16 workers of n = 8:
    the standard error of the ratio is ~1.2%; the tolerance is 5%."""
    rng = np.random.default_rng(0)
    d, s, n, k, steps = 4, 1.0, 8, 16, 4000
    delta = np.full(d, 0.15)
    x = rng.standard_normal((steps, k * n, d))
    eps = s * rng.standard_normal((steps, k * n))
    s_small, s_big = _parts(x * (x @ delta - eps)[..., None], n)

    grad_squared, trace, ratio = _averaged(s_small, s_big, n=n, kn=k * n, population=None)
    truth = ((d + 1) * delta @ delta + d * s ** 2) / (delta @ delta)  # 49.4 images
    np.testing.assert_allclose(ratio, truth, rtol=0.05)
    np.testing.assert_allclose(trace, truth * delta @ delta, rtol=0.02)
    np.testing.assert_allclose(grad_squared, delta @ delta, rtol=0.05)
    # Why the parts are averaged before the ratio: one step's |G|^2 estimate is often < 0.
    single = [noise_scale.step_estimates(a, b, small=n, big=k * n, population=None)[0]
              for a, b in zip(s_small, s_big, strict=True)]
    assert 0.01 < np.mean(np.array(single) < 0) < 0.5


def test_finite_training_set_needs_the_population_correction():
    """A fixed set of N = 512 examples, batches of kn = 256 drawn without replacement (as
    every epoch's permutation draws them, Remark 4): the truth is the population's
    tr(Sigma) / |G|^2, computed from all N gradients. Corrected, the estimate is within 3%;
    with c(B) = 1 / B, |G|^2 comes out as |G|^2 - tr(Sigma) / (N - 1) (the module's
    docstring) and B_simple ~16% too large."""
    rng = np.random.default_rng(1)
    d, s, big_n, kn, n, steps = 4, 1.0, 512, 256, 8, 3000
    delta = np.full(d, 0.15)
    x = rng.standard_normal((big_n, d))
    per_example = x * (x @ delta - s * rng.standard_normal(big_n))[:, None]
    mean = per_example.mean(axis=0)
    trace_true = np.sum((per_example - mean) ** 2, axis=1).mean()
    truth = trace_true / (mean @ mean)
    draws = np.argsort(rng.random((steps, big_n)), axis=1)[:, :kn]
    s_small, s_big = _parts(per_example[draws], n)

    _, _, corrected = _averaged(s_small, s_big, n=n, kn=kn, population=big_n)
    np.testing.assert_allclose(corrected, truth, rtol=0.03)
    grad_squared, trace, uncorrected = _averaged(s_small, s_big, n=n, kn=kn, population=None)
    np.testing.assert_allclose(grad_squared, mean @ mean - trace_true / (big_n - 1), rtol=0.03)
    np.testing.assert_allclose(trace, trace_true * big_n / (big_n - 1), rtol=0.03)
    assert uncorrected / truth - 1 > 0.1


def test_expected_squared_norms_give_back_the_parts_exactly():
    """Sampling theory's E[S_B] = |G|^2 + tr(Sigma) (N - B) / (B (N - 1)) maps back to the two
    parts, for finite and infinite populations."""
    for population in (None, 1000):
        def expected(b, population=population):
            return 3.0 + 80.0 * (1 / b if population is None else
                                 (population - b) / (b * (population - 1)))

        np.testing.assert_allclose(noise_scale.step_estimates(
            expected(32), expected(512), small=32, big=512, population=population), (3.0, 80.0))
    with pytest.raises(ValueError, match="small < big"):
        noise_scale.step_estimates(1.0, 1.0, small=32, big=32, population=None)


def test_running_average_is_bias_corrected_and_continues_from_a_row():
    """Each part is sum_i DECAY^(c-i) x_i / sum_i DECAY^(c-i) over the c probes so far; a
    RunningEstimate resumed from a row written after probe 5 continues bit for bit."""
    rng = np.random.default_rng(2)
    s_small = rng.uniform(5, 6, 12)
    s_big = rng.uniform(0.5, 1.5, 12)
    whole = noise_scale.RunningEstimate(small=8, big=64, population=None)
    assert whole.columns() == {} and whole.noise_scale is None
    for a, b in zip(s_small, s_big, strict=True):
        whole.add(a, b)
    parts = np.array([noise_scale.step_estimates(a, b, small=8, big=64, population=None)
                      for a, b in zip(s_small, s_big, strict=True)])
    weights = noise_scale.DECAY ** np.arange(11, -1, -1)
    expected = weights @ parts / weights.sum()
    np.testing.assert_allclose([whole.grad_squared, whole.trace], expected, rtol=1e-12)
    assert whole.columns()[noise_scale.NOISE_SCALE] == whole.trace / whole.grad_squared
    assert whole.columns()[noise_scale.PROBES] == 12

    first = noise_scale.RunningEstimate(small=8, big=64, population=None)
    for a, b in zip(s_small[:5], s_big[:5], strict=True):
        first.add(a, b)
    row = {"step": 50, "loss": 1.0, **first.columns()}
    resumed = noise_scale.RunningEstimate(small=8, big=64, population=None)
    resumed.resume_from(row)
    for a, b in zip(s_small[5:], s_big[5:], strict=True):
        resumed.add(a, b)
    assert resumed.columns() == whole.columns()


def test_ratio_is_left_out_while_the_averaged_gradient_is_not_positive():
    estimate = noise_scale.RunningEstimate(small=8, big=64, population=None)
    estimate.add(5.0, 0.5)  # S_big below S_small / k: |G|^2 ~ (64 x 0.5 - 8 x 5) / 56 < 0
    assert estimate.grad_squared < 0
    assert noise_scale.NOISE_SCALE not in estimate.columns()
    assert noise_scale.TRACE in estimate.columns()
