"""Drivers around the Streamer protocol: scanned multi-chunk steps, a Python streaming loop,
row resets, carry sizes and a plain-pytree view of a model."""

from __future__ import annotations

import functools
import math
import jax
import jax.numpy as jnp
from flax import nnx

from streamzoo.core.packed import call_with_carry
from streamzoo.core.seq import Seq


def multistep(model, carry, xs: Seq):
    """`lax.scan` of `model.step` over a leading chunk axis: xs is `[K, B, T, ...]`.

    One dispatch for K chunks; returns `(carry, ys)` with ys `[K, B, T_out, ...]`.
    """
    if not isinstance(xs, Seq) or xs.values.ndim < 3 or xs.mask.ndim != 3:
        shape = getattr(getattr(xs, "values", None), "shape", None)
        raise ValueError(f"xs: expected a Seq with a leading chunk axis [K, B, T, ...], got {shape}")
    return jax.lax.scan(model.step, carry, xs)


def chunked(x: Seq, chunk_size: int) -> Seq:
    """`[B, T, ...]` -> `[T // chunk_size, B, chunk_size, ...]` for `multistep`."""
    if x.length % chunk_size:
        raise ValueError(f"chunk_size: T={x.length} is not a multiple of chunk_size={chunk_size}")
    k = x.length // chunk_size

    def split(a):
        a = a.reshape(a.shape[0], k, chunk_size, *a.shape[2:])
        return jnp.moveaxis(a, 1, 0)

    return Seq(split(x.values), split(x.mask), compact=x.compact)  # chunks of a prefix stay prefixes


def unchunked(ys: Seq) -> Seq:
    """Inverse of `chunked`: `[K, B, T, ...]` -> `[B, K * T, ...]`."""

    def merge(a):
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])

    return Seq(merge(ys.values), merge(ys.mask), compact=False)


@jax.jit
def jitted_step(model, carry, x):
    """`model.step` under one shared `jax.jit` (compiles once per model and chunk shape).
    `carry` may be a `PackedCarry` (then so is the returned one)."""
    return call_with_carry(model.step, carry, x)


@jax.jit
def jitted_flush(model, carry):
    """`model.flush` under one shared `jax.jit` (`carry` may be a `PackedCarry`)."""
    return call_with_carry(model.flush, carry)


@jax.jit
def jitted_apply(model, x):
    """`model(x)` (offline) under one shared `jax.jit`."""
    return model(x)


@functools.lru_cache(maxsize=128)
def _bound(graphdef, treedef, method: str, donate_carry: bool):
    """One `jax.jit` per (module structure, method): models of the same structure share it,
    so its compilation cache is shared too."""

    def call(leaves, carry, *args):
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
        return call_with_carry(getattr(model, method), carry, *args)

    return jax.jit(call, donate_argnums=(1,) if donate_carry else ())


class BoundStep:
    """A jitted method of a module whose parameters were split into leaves once:
    `bound(carry, x)` calls it; `bound.compile(carry, x)` compiles ahead of time (to time the
    compilation apart) and returns a callable of the same form."""

    def __init__(self, fn, leaves):
        self._fn, self._leaves = fn, leaves

    def __call__(self, *args):
        return self._fn(self._leaves, *args)

    def compile(self, *args):
        compiled = self._fn.lower(self._leaves, *args).compile()
        leaves = self._leaves
        return lambda *a: compiled(leaves, *a)


def _bind(model, method: str, donate_carry: bool) -> BoundStep:
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    try:
        fn = _bound(graphdef, treedef, method, donate_carry)
    except TypeError:  # an unhashable static attribute (a list, say): a jit of its own
        fn = _bound.__wrapped__(graphdef, treedef, method, donate_carry)
    return BoundStep(fn, leaves)


def jit_step(model, *, donate_carry: bool = False):
    """`model.step` jitted with the module split into (structure, parameter leaves) once.

    Returns `step(carry, x) -> (carry, y)` (a `BoundStep`). Faster per call than
    `jax.jit(lambda m, c, x: m.step(c, x))(model, c, x)`, which flattens the NNX module on
    every call (tens of µs, more than a small step's compute): use it in hot streaming loops.
    The parameters are read when `jit_step` is called; call it again after updating them.
    `donate_carry=True` lets XLA reuse the carry's buffers (the carry passed in is consumed).
    `carry` may be a `PackedCarry` (`pack_carry(carry)`; the step returns the next one packed):
    a few buffers instead of one per layer buffer cross the call, which saves a few µs per
    carry array per call.
    """
    return _bind(model, "step", donate_carry)


def jit_flush(model):
    """`model.flush` jitted like `jit_step`: returns `flush(carry) -> (carry, y)`."""
    return _bind(model, "flush", False)


def _split_sizes(length: int, chunk_sizes, block_size: int) -> list[int]:
    if isinstance(chunk_sizes, int):
        if chunk_sizes < 1:
            raise ValueError(f"chunk_sizes: expected a positive int, got {chunk_sizes}")
        sizes = [chunk_sizes] * (length // chunk_sizes)
        if length % chunk_sizes:
            sizes.append(length % chunk_sizes)
    else:
        sizes = [int(s) for s in chunk_sizes]
        if sum(sizes) != length:
            raise ValueError(f"chunk_sizes: expected sizes summing to T={length}, got sum {sum(sizes)}")
    for s in sizes:
        if s < 1:
            raise ValueError(f"chunk_sizes: expected positive sizes, got {sizes}")
    return sizes


def stream(model, x: Seq, chunk_sizes, *, carry=None, jit: bool = True, with_flush: bool = True):
    """Feed `x` to `model.step` chunk by chunk (a Python loop, for demos and tests).

    `chunk_sizes`: an int (the last chunk may be shorter) or a list summing to T. A chunk that
    is not a multiple of `model.spec.block_size` is padded with invalid frames, which are
    skipped. Returns `(carry, y)` where y holds each row's valid outputs first (compacted),
    including what `flush` emits at the end when `with_flush`.
    """
    sizes = _split_sizes(x.length, chunk_sizes, model.spec.block_size)
    step = jit_step(model) if jit else model.step
    flush = jit_flush(model) if jit else model.flush
    if carry is None:
        carry = model.init_carry(x.batch_size)
    outs, start = [], 0
    for size in sizes:
        chunk = x.time_slice(start, start + size).pad_to_multiple(model.spec.block_size)
        carry, y = step(carry, chunk)
        outs.append(y)
        start += size
    if with_flush:
        carry, tail = flush(carry)
        outs.append(tail)
    return carry, Seq.concatenate(outs).compacted()


def reset_rows(model, carry, rows):
    """Re-initialise the carry rows where `rows [B]` is True (slot reuse)."""
    return model.reset_rows(carry, rows)


def carry_nbytes(carry) -> int:
    """Bytes held by a carry (works on arrays and on `jax.eval_shape` results)."""
    return int(sum(jnp.dtype(a.dtype).itemsize * math.prod(a.shape)
                   for a in jax.tree_util.tree_leaves(carry)))


def pure(model):
    """`(graphdef, params, step_fn)` with `step_fn(params, carry, x) -> (carry, y)` pure.

    For users who keep parameters as a plain pytree (optax, orbax, sharding rules). `carry`
    may be a `PackedCarry` (then so is the returned one).
    """
    graphdef, params = nnx.split(model)

    def step_fn(params, carry, x):
        return call_with_carry(nnx.merge(graphdef, params).step, carry, x)

    return graphdef, params, step_fn
