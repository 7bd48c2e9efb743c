"""The gradient noise scale (lbsgd/noise_scale.py, McCandlish et al. 2018, App. A): the
estimator against closed forms and sampled regression problems, its running average, and the
probed train step against the plain step and a loop over the workers."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

from lbsgd import hlo, models, noise_scale, parallel, train
from tests.helpers import metrics_rows, run_lbsgd, tiny_config


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
    tr(Sigma) / |G|^2 = 48.6, computed from all N gradients. Corrected, the estimate is
    within 3%; with c(B) = 1 / B, |G|^2 comes out as |G|^2 - tr(Sigma) / (N - 1) (the
    module's docstring) and B_simple 11% too large, also within 3%."""
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
    biased = trace_true * big_n / (big_n - 1) / (mean @ mean - trace_true / (big_n - 1))
    assert biased / truth - 1 > 0.1  # ~1 / (1 - B_simple / N): 3% tolerances tell them apart
    np.testing.assert_allclose(uncorrected, biased, rtol=0.03)


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


def test_last_train_row_is_the_resumes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0, "noise_scale_probes": 1}\n'
                    '{"step": 4, "loss": 1.0, "noise_scale_probes": 2}\n'
                    '{"step": 4, "eval_top1": 0.5}\n'
                    '{"step": 6, "loss": 1.0, "noise_scale_probes": 3}\n')
    assert train.last_train_row(str(path), 5)["noise_scale_probes"] == 2
    assert train.last_train_row(str(path), 1) is None
    assert train.last_train_row(str(tmp_path / "none.jsonl"), 5) is None


def _same_update(a, b):
    for tree in ("params", "batch_stats", "opt_state"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                     getattr(a, tree), getattr(b, tree))


CONFIG = dict(global_batch_size=64, bn_group_size=8, warmup="none", weight_decay=1e-3,
              noise_scale_every_steps=3)


@pytest.fixture(scope="session")
def steps():
    """One batch of 8 workers of n = 8: the plain step on one device, and the probed step on
    4 devices with PROBE_GRADIENT_BYTES so small that a slice holds one worker's gradient
    (each device's 2 workers in 2 slices, as microbatch_size=32 would also make), compiled
    ahead of time as the loop compiles it. (One device's probe would need a compile more.)"""
    config = tiny_config(**CONFIG)
    plain_ex = train.setup(config, parallel.make_mesh(jax.devices()[:1]))
    batch = jax.device_get(next(plain_ex.train_batches()))
    state = jax.device_get(plain_ex.init_state())  # host arrays: each step shards its copy
    plain = jax.device_get(plain_ex.train_step(state, batch))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "PROBE_GRADIENT_BYTES", 1)
        ex = train.setup(config, parallel.make_mesh(jax.devices()[:4]))
        probe = ex.probe_step.lower(state, batch).compile()
    probed = jax.device_get(probe(state, batch))
    return plain_ex, state, batch, plain, probe, probed


def test_probe_slices_are_bounded_by_gradient_memory(monkeypatch):
    config = tiny_config(**CONFIG)
    assert train.probe_microbatches(config, 4, param_count=78_000) == 1  # 2 x 312 KB fit
    assert train.probe_microbatches(tiny_config(**CONFIG, microbatch_size=32), 4, 78_000) == 2
    monkeypatch.setattr(train, "PROBE_GRADIENT_BYTES", 4 * 78_000)  # one worker's gradient
    assert train.probe_microbatches(config, 4, param_count=78_000) == 2
    assert train.probe_microbatches(config, 1, param_count=78_000) == 8


def test_probe_is_the_plain_step_and_measures_each_workers_gradient(steps):
    """The probed step's update is the plain step's (the mean of the workers' gradients is the
    step's gradient, Remark 3), whatever its devices and slices; S_big is |the plain step's
    data gradient|^2 and S_small the mean |g_j|^2 of the 8 workers, each differentiated on
    its own with its own BN."""
    ex, state, batch, (plain_state, plain), _, (probed_state, probed) = steps
    _same_update(probed_state, plain_state)
    np.testing.assert_allclose(probed["loss"], plain["loss"], rtol=1e-6)
    assert probed["train_top1"] == plain["train_top1"]
    np.testing.assert_allclose(probed["s_big"], plain["grad_norm"] ** 2, rtol=1e-5)
    assert "s_small" not in plain

    n = ex.config.bn_group_size
    worker = models.create_model(ex.config.model, num_classes=10, in_channels=1,
                                 norm=models.grouped_norm(group_size=n))
    graphdef = nnx.split(worker)[0]

    @jax.jit
    def worker_grad(stats, images, labels):
        def loss(params):
            model = nnx.merge(graphdef, params, stats)
            return train.cross_entropy(model(images, train=True), labels).mean()
        return jax.grad(loss)(state.params)

    images = train.normalize(jnp.asarray(batch["image"]), ex.dataset, jnp.float32)
    grads = []
    for w in range(ex.config.global_batch_size // n):
        rows = slice(w * n, (w + 1) * n)
        g = worker_grad(jax.tree.map(lambda x, w=w: x[w:w + 1], state.batch_stats),
                        images[rows], batch["label"][rows])
        grads.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
    grads = np.array(grads, dtype=np.float64)
    np.testing.assert_allclose(probed["s_small"], np.mean(np.sum(grads ** 2, axis=1)),
                               rtol=1e-5)
    mean = grads.mean(axis=0)
    np.testing.assert_allclose(probed["s_big"], mean @ mean, rtol=1e-5)
    assert probed["s_small"] > 2 * probed["s_big"]  # the workers' gradients do differ


def test_probe_all_reduces_each_gradient_once_and_three_scalars(steps):
    _, _, _, (plain_state, _), probe, _ = steps
    collectives = hlo.parse_collectives(probe.as_text())
    assert {c["op"] for c in collectives} == {"all-reduce"}, collectives
    tensors = [t for c in collectives for t in c["tensors"]]
    reduced = collections.Counter(tuple(t["shape"]) for t in tensors if t["shape"])
    gradients = collections.Counter(tuple(x.shape) for x in jax.tree.leaves(plain_state.params))
    assert not reduced - gradients  # nothing but gradients, none twice
    assert len([t for t in tensors if not t["shape"]]) <= 3  # loss, top-1, sum of |g_j|^2


def test_probe_off_builds_the_plain_step_only():
    """With the probe on, the plain steps between probes are the very program of a run without
    it (the same lowered HLO), and a run without it builds no probe."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    off = train.setup(tiny_config(**{**CONFIG, "noise_scale_every_steps": 0}), mesh)
    on = train.setup(tiny_config(**CONFIG), mesh)
    assert off.probe_step is None and on.probe_step is not None
    state, batch = jax.eval_shape(off.init_state), next(off.train_batches())
    assert off.train_step.lower(state, batch).as_text() == on.train_step.lower(
        state, batch).as_text()


@pytest.mark.slow
def test_command_logs_the_noise_scale(tmp_path):
    """The public command with --config.noise_scale_every_steps: probes at steps 2 and 4
    (8 workers of n = 32 on 8 devices), each row carries the running averages and their ratio,
    in metrics.jsonl and TensorBoard."""
    result = run_lbsgd(tmp_path, "--config.global_batch_size=256", "--config.max_steps=4",
                       "--config.log_every_steps=2", "--config.noise_scale_every_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "and the noise-scale probe (every 2 steps)" in result.stderr
    rows = [r for r in metrics_rows(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert [r[noise_scale.PROBES] for r in rows] == [1, 2]
    for row in rows:
        assert row[noise_scale.TRACE] > 0 and np.isfinite(row[noise_scale.GRAD_SQUARED])
        if row[noise_scale.GRAD_SQUARED] > 0:
            assert row[noise_scale.NOISE_SCALE] == pytest.approx(
                row[noise_scale.TRACE] / row[noise_scale.GRAD_SQUARED], rel=1e-12)
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"noise_scale/trace", "noise_scale/grad_sq", "noise_scale/probes"} <= set(
        events.Tags()["tensors"])
