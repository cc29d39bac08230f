"""Shared by the kernel tests: per-dtype tolerances and one jitted program per kernel call."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative to the output's scale


def call(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` as one jitted program (cached per function and static options):
    eager calls would compile every primitive separately, which dominates CPU test time."""
    static = tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, jax.Array)))
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    return _jitted(fn, static)(*args, **arrays)


@functools.lru_cache(maxsize=None)
def _jitted(fn, static):
    return jax.jit(functools.partial(fn, **dict(static)))
