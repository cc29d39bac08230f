"""Ring attention: context-parallel attention with the sequence split over a mesh axis.

Each device of the `seq` axis holds one contiguous block of queries, keys and values. The
key/value blocks travel around the ring (`jax.lax.ppermute` to the next device) while every
device attends its queries to the block it currently holds; partial results are merged with
the log-sum-exp (online softmax) rule, so the result equals attention over the whole
sequence while no device ever holds more than two key/value blocks.

The visibility rule is the one of `streamzoo.layers.attention.attention_reference` (frames at
global positions `0..T-1`): query p sees key k when `k <= p + max_future` and
`k >= p - max_past` (`None` = unbounded), and `k_valid[k]`. For causal attention with a
window (`max_future=0`, finite `max_past`) only the blocks that can hold visible keys are
visited, so a short window costs a few ring steps instead of one per device. Blocks that are
entirely masked for a device skip their compute (`lax.cond`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


def _check(q, k, v, k_valid, mesh, axis):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v: expected [B, T, H, Dh] and two equal [B, T, Hkv, Dh], got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    batch, length, heads, head_dim = q.shape
    if k.shape[:2] != (batch, length) or k.shape[3] != head_dim or heads % k.shape[2]:
        raise ValueError(f"k: expected [B={batch}, T={length}, Hkv, Dh={head_dim}] with Hkv "
                         f"dividing H={heads}, got {k.shape}")
    if k_valid is not None and (k_valid.shape != (batch, length) or k_valid.dtype != jnp.bool_):
        raise ValueError(f"k_valid: expected bool [{batch}, {length}], got "
                         f"{k_valid.dtype}{list(k_valid.shape)}")
    if not isinstance(mesh, Mesh) or axis not in mesh.shape:
        raise ValueError(f"axis: expected a mesh axis of {getattr(mesh, 'shape', mesh)}, "
                         f"got {axis!r}")
    if length % mesh.shape[axis]:
        raise ValueError(f"q: sequence length T={length} must be a multiple of the "
                         f"'{axis}' axis size {mesh.shape[axis]}")


def _ring_steps(n, block, max_past, max_future):
    """How many blocks (the own one first) a device must visit."""
    if max_future == 0 and max_past is not None:
        return min(n, 1 + math.ceil(max_past / block))
    return n


def ring_attention(q, k, v, *, mesh: Mesh, axis: str = "seq", max_past: int | None = None,
                   max_future: int | None = 0, k_valid=None, scale: float | None = None,
                   batch_axis: str | None = None, head_axis: str | None = None):
    """Attention of q `[B, T, H, Dh]` over k, v `[B, T, Hkv, Dh]` with T split over `axis`.

    `max_future=0` is causal, `max_future=None` bidirectional; `max_past` is the window
    (`None` = unbounded). `k_valid [B, T]` masks keys (e.g. end padding). `batch_axis` and
    `head_axis` optionally split B and the heads over further mesh axes (Hkv must divide by
    that axis). Scores and softmax statistics in float32; returns `[B, T, H, Dh]` in q's
    dtype, zero for a query that sees no key.
    """
    _check(q, k, v, k_valid, mesh, axis)
    batch, length, heads, head_dim = q.shape
    n = mesh.shape[axis]
    block = length // n
    steps = _ring_steps(n, block, max_past, max_future)
    scale = head_dim ** -0.5 if scale is None else scale
    if k_valid is None:
        k_valid = jnp.ones((batch, length), bool)

    def visible(q_pos, k_pos, valid):
        vis = valid[:, None, :] & jnp.ones((1, q_pos.shape[0], 1), bool)
        if max_future is not None:
            vis &= k_pos[None, None, :] <= q_pos[None, :, None] + max_future
        if max_past is not None:
            vis &= k_pos[None, None, :] >= q_pos[None, :, None] - max_past
        return vis  # [B, Tq, Tk]

    def local(q, k, v, valid):
        me = jax.lax.axis_index(axis)
        b, tq, h, dh = q.shape
        hkv = k.shape[2]
        qg = q.astype(jnp.float32).reshape(b, tq, hkv, h // hkv, dh) * scale
        q_pos = me * block + jnp.arange(block)
        out = jnp.zeros((b, hkv, h // hkv, tq, dh), jnp.float32)
        top = jnp.full((b, hkv, h // hkv, tq, 1), -jnp.inf, jnp.float32)
        total = jnp.zeros((b, hkv, h // hkv, tq, 1), jnp.float32)
        # The running state varies over the same mesh axes as the queries (shard_map types).
        vary = tuple(a for a in (axis, batch_axis, head_axis) if a is not None)
        out, top, total = (jax.lax.pcast(a, vary, to="varying") for a in (out, top, total))

        def attend(s, state, k, v, valid):
            out, top, total = state
            src = (me - s) % n
            k_pos = src * block + jnp.arange(block)
            vis = visible(q_pos, k_pos, valid)

            def compute(state):
                out, top, total = state
                scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32))
                scores = jnp.where(vis[:, None, None], scores, -jnp.inf)
                new_top = jnp.maximum(top, jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
                shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
                weights = jnp.exp(scores - shift)
                rescale = jnp.exp(top - shift)
                total = total * rescale + weights.sum(-1, keepdims=True)
                out = out * rescale + jnp.einsum("bhgqk,bkhd->bhgqd", weights,
                                                 v.astype(jnp.float32))
                return out, new_top, total

            return jax.lax.cond(vis.any(), compute, lambda st: st, (out, top, total))

        perm = [(d, (d + 1) % n) for d in range(n)]

        def body(s, carry):
            state, k, v, valid = carry
            k, v, valid = jax.lax.ppermute((k, v, valid), axis, perm)
            return attend(s, state, k, v, valid), k, v, valid

        state = attend(0, (out, top, total), k, v, valid)
        if steps > 1:
            state, *_ = jax.lax.fori_loop(1, steps, body, (state, k, v, valid))
        out, _, total = state
        out = out / jnp.where(total > 0, total, 1.0)
        return jnp.moveaxis(out, 3, 1).reshape(b, tq, h, dh).astype(q.dtype)

    spec = P(batch_axis, axis, head_axis, None)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch_axis, axis)),
                           out_specs=spec)
    return mapped(q, k, v, k_valid)


__all__ = ["ring_attention"]
