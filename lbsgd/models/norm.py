"""BatchNorm with statistics over fixed-size groups of the batch ("virtual workers").

Goyal et al. (2017), Sec. 2.3 and Sec. 5.1: with k workers and n images per worker, BN
statistics are computed per worker over its n = 32 images, never over the whole minibatch
of kn images. The per-worker batch size n is part of the loss being optimized, so changing
it changes the model, not just its speed.

We decouple n from the hardware: the batch axis is reshaped to [B/n, n, ...] and each group
of n consecutive examples is normalized with its own statistics. The computation is purely
local (no collectives): when the batch is sharded over devices on its leading axis and B/n
groups divide evenly among them, every group lives on a single device.
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


def _group(x: jax.Array, group_size: int) -> jax.Array:
    """[B, ..., C] -> [B/g, g, ..., C]."""
    _check_batch(x.shape[0], group_size)
    return x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])


def _reduce_axes(grouped: jax.Array) -> tuple[int, ...]:
    """All axes of a grouped array except the group axis (0) and the channel axis (-1)."""
    return tuple(range(1, grouped.ndim - 1))


def grouped_moments(x: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-group mean and biased variance of x [B, ..., C], in float32.

    Returns (mean, var), each [B/group_size, C]. The variance is computed in two passes,
    mean((x - mean)^2), which is stable in float32 where E[x^2] - E[x]^2 can cancel.
    """
    xg = _group(x, group_size).astype(jnp.float32)
    axes = _reduce_axes(xg)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    return mean.reshape(xg.shape[0], -1), var.reshape(xg.shape[0], -1)


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
        mean, var = grouped_moments(x, self.group_size)  # [G, C] each
        xg = _group(x, self.group_size).astype(jnp.float32)
        # [G, C] -> [G, 1, ..., 1, C] to broadcast against the grouped input.
        bshape = (xg.shape[0],) + (1,) * (xg.ndim - 2) + (xg.shape[-1],)
        y = self._normalize(xg, mean.reshape(bshape), var.reshape(bshape))
        self._update_running(mean, var)
        return y.reshape(x.shape)

    def _update_running(self, mean: jax.Array, var: jax.Array) -> None:
        m = self.momentum
        # Running statistics are not differentiated through.
        mean, var = jax.lax.stop_gradient((mean, var))  # [G, C]: each row from its own group
        self.mean[...] = m * self.mean[...] + (1.0 - m) * mean
        self.var[...] = m * self.var[...] + (1.0 - m) * var
