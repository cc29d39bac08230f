"""Argument checks shared by layers: a `ValueError` that names the argument, the expected and
the actual value."""

from __future__ import annotations

import jax.numpy as jnp


def check_positive_int(name: str, value) -> int:
    """A positive int (not a bool), or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_float_dtype(dtype, name: str = "dtype"):
    """None or a floating dtype, or a ValueError naming `name`."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{name}: expected None or a floating dtype, got {dtype!r}") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{name}: expected None or a floating dtype, got {dt}")
    return dt
