"""BatchNorm with statistics over fixed-size groups of the batch ("virtual workers").

Goyal et al. (2017), Sec. 2.3 and Sec. 5.1: with k workers and n images per worker, BN
statistics are computed per worker over its n = 32 images, never over the whole minibatch
of kn images. The per-worker batch size n is part of the loss being optimized, so changing
it changes the model, not just its speed.

We decouple n from the hardware: the batch axis is reshaped to [B/n, n, ...] and each group
of n consecutive examples is normalized with its own statistics. The computation is purely
local (no collectives): when the batch is sharded over devices on its leading axis and B/n
groups divide evenly among them, every group lives on a single device.

The statistics take one pass over the activations (`_shifted_sums`): the sums of x - s and of
(x - s)^2, in float32, with a shift s near the data's mean (each worker's running mean) that
keeps E[d^2] - E[d]^2 from cancelling.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def _check_batch(batch_size: int, group_size: int) -> None:
    if group_size <= 0 or batch_size % group_size != 0:
        raise ValueError(
            f"batch size {batch_size} is not divisible by bn_group_size {group_size}; "
            "BatchNorm statistics are computed over groups of exactly bn_group_size examples"
        )


def _per_example(v: jax.Array, group_size: int, ndim: int) -> jax.Array:
    """A per-group [G, C] array as [G * group_size, 1, ..., 1, C]: group g's row for each of
    its examples, to broadcast against an input of rank `ndim`."""
    rows = jnp.broadcast_to(v[:, None, :], (v.shape[0], group_size, v.shape[-1]))
    return rows.reshape((-1,) + (1,) * (ndim - 2) + (v.shape[-1],))


def _shifted_sums(
    x: jax.Array, group_size: int, shift: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """(E[d], var) per group, [B/group_size, C] each, of x [B, ..., C] with d = x - shift.

    One pass: E[d] and E[d^2] are two reductions of the same d, which XLA fuses into one
    kernel reading x once (the two-pass mean((x - mean)^2) reads it twice, and its gradient
    once more). x (bf16 or float32) is accumulated in float32, per example over its
    positions, then over the examples of each group: the same sums, in a shape in which
    XLA's GPU compiler fuses BatchNorm's forward and backward as it does a plain BatchNorm's.

    var = E[d^2] - E[d]^2 is the variance for any shift; the shift decides only the rounding:
    the error of the subtraction grows like eps_float32 x ((mean - shift) / std)^2, so a shift
    near the data's mean makes it as exact as the two-pass formula, while shift 0 (the naive
    E[x^2] - E[x]^2) loses every digit where |mean| / std is large (~1e3 and beyond in
    float32). The shift (float32 [G, C], or None for 0) is a constant: no gradient flows into
    it, and neither the statistics nor their gradient depend on it, only their rounding.
    Clamped at 0 against rounding, like Flax's one-pass BatchNorm.
    """
    _check_batch(x.shape[0], group_size)
    groups, channels = x.shape[0] // group_size, x.shape[-1]
    d = x.astype(jnp.float32)
    if shift is not None:
        d = d - _per_example(jax.lax.stop_gradient(shift), group_size, x.ndim)
    positions = tuple(range(1, x.ndim - 1))  # of one example, all but the channel axis

    def group_mean(v):  # [B, ..., C] -> [G, C]
        per_example = jnp.sum(v, axis=positions).reshape(groups, group_size, channels)
        return jnp.sum(per_example, axis=1) / (x.size // (groups * channels))

    mean_d = group_mean(d)
    var = jnp.maximum(group_mean(jnp.square(d)) - jnp.square(mean_d), 0.0)
    return mean_d, var


def grouped_moments(
    x: jax.Array, group_size: int, shift: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-group mean and biased variance of x [B, ..., C], in float32, in one pass.

    Returns (mean, var), each [B/group_size, C]: mean = shift + E[d], var = E[d^2] - E[d]^2
    with d = x - shift (`_shifted_sums`). `shift` is a per-group, per-channel value
    [B/group_size, C] (or [C], or anything that broadcasts to it) near the data's mean;
    GroupedBatchNorm passes each worker's running mean. None means 0, the naive
    E[x^2] - E[x]^2: exact enough only where |mean| / std is small, as for the normalized
    activations of a network at initialization, and catastrophically wrong where it is large.
    """
    _check_batch(x.shape[0], group_size)
    if shift is not None:
        rows = (x.shape[0] // group_size, x.shape[-1])
        shift = jnp.broadcast_to(jnp.asarray(shift, jnp.float32), rows)
    mean_d, var = _shifted_sums(x, group_size, shift)
    return (mean_d if shift is None else jax.lax.stop_gradient(shift) + mean_d), var


class GroupedBatchNorm(nnx.Module):
    """BatchNorm whose training statistics are computed per group of `group_size` examples.

    Training mode: the batch [B, ..., C] is split into G = B / group_size consecutive groups;
    each group is normalized with its own mean and biased variance over all of its
    group_size * H * W values per channel (Goyal et al. Sec. 5.1: statistics per worker,
    n = 32). Then y = gamma * xhat + beta.

    Running statistics are kept per worker, as each GPU of the paper kept its own: `mean` and
    `var` are [num_groups, C], row g updated from group g only,

        mean[g] <- m * mean[g] + (1 - m) * mean_g
        var[g]  <- m * var[g]  + (1 - m) * var_g

    where mean_g and var_g are group g's mean and *biased* variance, i.e. the statistics that
    worker actually normalized with (with n * H * W values per group the factor N / (N - 1)
    is negligible). Eval mode normalizes with the average over workers of the rows. The
    running average is linear, so that average equals a single running average of the
    group-averaged statistics; keeping the rows apart only moves the reduction over groups
    from every training step to evaluation. In training the rows live with their groups
    (sharded on the same axis as the batch), so a train step needs no communication for
    BatchNorm at all: the gradient all-reduce stays the only collective, as in the paper.

    gamma and beta are named so on purpose: the optimizer excludes exactly the leaves named
    gamma/beta from weight decay (Sec. 5.1 applies decay to weights only).
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int,
        num_groups: int = 1,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        zero_init: bool = False,
        dtype=None,
    ):
        if group_size <= 0:
            raise ValueError(f"bn_group_size must be positive, got {group_size}")
        if num_groups <= 0:
            raise ValueError(f"bn_num_groups must be positive, got {num_groups}")
        self.num_features = num_features
        self.group_size = group_size
        self.num_groups = num_groups
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        # Sec. 5.1: the last BN gamma of each residual block starts at 0 so every block
        # starts as the identity; all other gammas start at 1.
        gamma_init = jnp.zeros if zero_init else jnp.ones
        self.gamma = nnx.Param(gamma_init((num_features,), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_groups, num_features), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_groups, num_features), jnp.float32))

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out_dtype = self.dtype if self.dtype is not None else x.dtype
        if train:
            y = self._normalize_train(x)
        else:
            # Every worker's running averages count equally (Sec. 5.1 per-worker BN).
            mean, var = self.mean[...].mean(axis=0), self.var[...].mean(axis=0)
            y = self._normalize(x.astype(jnp.float32), mean, var)
        return y.astype(out_dtype)

    def _normalize(self, x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
        """Affine-normalize float32 x; mean/var broadcast against x's trailing axis."""
        scale = jax.lax.rsqrt(var + self.epsilon) * self.gamma[...]
        return (x - mean) * scale + self.beta[...]

    def _normalize_train(self, x: jax.Array) -> jax.Array:
        if x.shape[0] != self.group_size * self.num_groups:
            raise ValueError(
                f"training batch of {x.shape[0]} examples, but this BatchNorm keeps running "
                f"statistics for {self.num_groups} workers of bn_group_size {self.group_size} "
                f"(= {self.group_size * self.num_groups} examples): build the model with "
                "bn_num_groups = global_batch_size // bn_group_size"
            )
        # One pass (`_shifted_sums`), shifted by each worker's own running mean, row g for
        # group g: the exponential average of exactly this group's past means, it follows
        # the data (it closes the gap to a steady mean by the factor `momentum` every step)
        # and lives on the group's device. The mean over the rows would be as good a shift
        # but needs the other devices' rows: an all-reduce in every BN layer of every step.
        # At initialization the rows are 0, the naive formula, exact for the first batches
        # of a ResNet, whose BN inputs are near zero mean against their std.
        shift = jax.lax.stop_gradient(self.mean[...])  # [G, C]
        mean_d, var = _shifted_sums(x, self.group_size, shift)
        mean = shift + mean_d
        # y = (x - mean) * gamma / sqrt(var + eps) + beta as x * a + b, with a and b per group
        # [G, C] given to each example: the parameters meet the activations only through a
        # and b, so the gradient takes two sums per example (of dy and of dy * x) and sums
        # them over the group, the shape of the statistics' own sums. x * a + b rounds at the
        # scale of |x * a| (relative error ~ eps_float32 x |mean| / std), as x - mean did.
        a = jax.lax.rsqrt(var + self.epsilon) * self.gamma[...]
        b = self.beta[...] - mean * a
        g = self.group_size
        y = x.astype(jnp.float32) * _per_example(a, g, x.ndim) + _per_example(b, g, x.ndim)
        self._update_running(mean, var)
        return y

    def _update_running(self, mean: jax.Array, var: jax.Array) -> None:
        m = self.momentum
        # Running statistics are not differentiated through.
        mean, var = jax.lax.stop_gradient((mean, var))  # [G, C]: each row from its own group
        self.mean[...] = m * self.mean[...] + (1.0 - m) * mean
        self.var[...] = m * self.var[...] + (1.0 - m) * var
