"""lbsgd: the large-minibatch SGD recipe of Goyal et al. 2017 in JAX/Flax (docs/design.md)."""
