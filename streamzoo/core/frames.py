"""Per-row frame gathers: every row of a batch sits at its own time, so reading or writing a
carry buffer takes a per-row offset (never a Python loop over rows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def take_frames(values: jax.Array, start: jax.Array, length: int) -> jax.Array:
    """Per row b: `values[b, start[b] : start[b] + length]`, indices clipped to the last frame.

    `values` is `[B, T, ...]`, `start` is `[B]` int; the result is `[B, length, ...]`.
    """
    idx = jnp.minimum(start[:, None] + jnp.arange(length)[None, :], values.shape[1] - 1)
    idx = idx.reshape(idx.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, idx, axis=1)
