"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018,
arXiv:1812.06162), estimated from the per-worker gradients of probed train steps.

McCandlish et al. find that the critical batch size, beyond which a larger batch buys few
fewer steps, is B_simple to within an order of magnitude, and that it grows as the loss falls.
Their unbiased estimator (App. A) needs the squared norm of the gradient at two batch sizes.
lbsgd has both in every step: with BatchNorm per worker, each virtual worker's gradient g_j
over its n images is a small-batch gradient of its own, independent of the other workers, and
the step's gradient is their mean (Remark 3). So B_small = n, B_big = kn, and per probed step

    S_small = mean_j |g_j|^2,    S_big = |mean_j g_j|^2

(the data gradient, before weight decay, in float32; train.train_step computes both).

Sampling. A mean of B per-example gradients drawn without replacement from the N training
examples (Remark 4: each step takes kn images of one permutation) has E|g_B|^2 =
|G|^2 + tr(Sigma) c(B), with Sigma the per-example gradient covariance over the training set
and c(B) = (N - B) / (B (N - 1)), the finite-population correction of 1/B. Solving the two
equations for B = n and B = kn gives the per-step estimates below, unbiased for any N; for
N -> infinity they are App. A's

    |G|^2 ~ (kn S_big - n S_small) / (kn - n),   tr(Sigma) ~ (S_small - S_big) / (1/n - 1/kn).

Without the correction (c(B) = 1 / B on a finite training set) the expected |G|^2 estimate
is |G|^2 - tr(Sigma) / (N - 1), whatever kn is: B_simple comes out too large by the factor
~1 / (1 - B_simple / N), which matters once B_simple is a sizeable fraction of N (kn near N
is where one would ask); tr(Sigma) itself is off only by N / (N - 1).

With BatchNorm a worker's gradient is not a mean of per-example gradients. The estimate is
then n x the covariance of one worker's gradient over |G|^2: the noise of the function lbsgd
trains, in images, for batches that are multiples of n (the only ones it runs). The
finite-population correction is derived for means of per-example gradients; for BatchNorm's
worker gradients it is an approximation whose own error is of order 1 / N.

Averaging. One step's |G|^2 estimate is a small difference of two noisy numbers, often
negative early in training; the ratio of two such estimates is meaningless. So the two parts
are averaged separately over probed steps, and only the averages are divided (App. A).
"""

import dataclasses
import math

# Weight of the past in the running average, per probed step: about the last 1 / (1 - DECAY)
# = 10 probes count. With a probe every 20 steps that is 200 steps (0.85 epochs of
# Fashion-MNIST at kn = 256).
DECAY = 0.9

# Row keys, in metrics.jsonl and TensorBoard.
NOISE_SCALE, GRAD_SQUARED, TRACE, PROBES = (
    "noise_scale", "noise_scale_grad_sq", "noise_scale_trace", "noise_scale_probes")


def variance_factor(batch_size: int, population: int | None) -> float:
    """c(B): the variance of a mean of B examples drawn without replacement from `population`
    is Sigma c(B) (1 / B times the finite-population correction (N - B) / (N - 1)); None
    means an infinite population (draws with replacement): 1 / B."""
    if population is None:
        return 1.0 / batch_size
    if not 1 <= batch_size <= population or population < 2:
        raise ValueError(f"batch of {batch_size} from a population of {population}")
    return (population - batch_size) / (batch_size * (population - 1))


def step_estimates(s_small: float, s_big: float, *, small: int, big: int,
                   population: int | None) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)), unbiased, from one step's S_small (mean squared norm of gradients
    over `small` examples) and S_big (squared norm of their mean over `big` examples).

    E[S_B] = |G|^2 + tr(Sigma) c(B) for B = small, big: two linear equations (McCandlish et
    al. 2018, App. A, with c(B) = 1 / B there)."""
    c_small, c_big = (variance_factor(b, population) for b in (small, big))
    if not c_small > c_big:
        raise ValueError(f"the noise scale needs small < big batches, got {small} and {big}")
    trace = (s_small - s_big) / (c_small - c_big)
    return s_big - c_big * trace, trace


@dataclasses.dataclass
class RunningEstimate:
    """Bias-corrected exponential averages of the per-step |G|^2 and tr(Sigma) estimates,
    updated once per probed step, and B_simple as the ratio of the two averages.

    The state is exactly what a metrics row holds (`columns`), so a resumed run continues it
    from its last row (`from_row`): the update is written on the corrected averages,

        avg_c = avg_{c-1} + (1 - DECAY) / (1 - DECAY^c) (x_c - avg_{c-1}),

    the DECAY-weighted mean of x_1 .. x_c normalized by its weights (Adam's bias
    correction), with avg_1 = x_1.
    """

    small: int  # n, images per BN worker
    big: int  # kn, images per step
    population: int | None  # N, training images (None: no finite-population correction)
    grad_squared: float = 0.0
    trace: float = 0.0
    probes: int = 0

    def add(self, s_small: float, s_big: float) -> None:
        grad_squared, trace = step_estimates(s_small, s_big, small=self.small, big=self.big,
                                             population=self.population)
        self.probes += 1
        weight = (1 - DECAY) / (1 - DECAY ** self.probes)
        self.grad_squared += weight * (grad_squared - self.grad_squared)
        self.trace += weight * (trace - self.trace)

    @property
    def noise_scale(self) -> float | None:
        """B_simple = tr(Sigma) / |G|^2 of the averages, in images; None while the averaged
        |G|^2 is not positive (too few probes to tell the gradient from its noise)."""
        if self.probes == 0 or not self.grad_squared > 0:
            return None
        return self.trace / self.grad_squared

    def columns(self) -> dict[str, float]:
        """A metrics row's columns: none before the first probe; `noise_scale` only where it
        is defined."""
        if self.probes == 0:
            return {}
        row = {GRAD_SQUARED: self.grad_squared, TRACE: self.trace, PROBES: self.probes}
        if self.noise_scale is not None:
            row[NOISE_SCALE] = self.noise_scale
        return row

    def resume_from(self, row: dict | None) -> None:
        """Continue from a metrics row written by `columns` (None or a row without: start)."""
        if row is not None and PROBES in row:
            self.grad_squared, self.trace = float(row[GRAD_SQUARED]), float(row[TRACE])
            self.probes = int(row[PROBES])


def ratio(trace: float, grad_squared: float) -> float:
    """tr(Sigma) / |G|^2, NaN where |G|^2 is not positive (for plots, which skip NaN)."""
    return trace / grad_squared if grad_squared > 0 else math.nan
