"""Rotary position embeddings (RoPE) driven by logical positions.

`apply_rope(x, positions)` rotates feature pairs `(x[i], x[i + Dh/2])` (the "rotate-half"
layout) by `positions * base**(-2i/Dh)`. Positions are explicit integer arrays, so a streaming
layer passes each row's logical frame counter and offline and streaming rotate identically;
physical buffer indices never enter. Angles are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inv_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
    """`[head_dim // 2]` float32 inverse frequencies `base ** (-2i / head_dim)`."""
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim: RoPE needs a positive even int, got {head_dim!r}")
    if not base > 0:
        raise ValueError(f"base: expected > 0, got {base!r}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return jnp.asarray(base, jnp.float32) ** -exponents


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
    """Rotate `x [..., T, H, Dh]` by integer `positions [..., T]`; returns x's dtype.

    `positions` must have exactly the shape `x.shape[:-2]` (one position per frame).
    """
    head_dim = x.shape[-1]
    inv_freq = rope_inv_frequencies(head_dim, base)
    if x.ndim < 3 or tuple(positions.shape) != tuple(x.shape[:-2]):
        raise ValueError(
            f"positions: expected shape {x.shape[:-2]} (the [..., T] axes of x), "
            f"got {positions.shape}")
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [..., T, 1, Dh/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
