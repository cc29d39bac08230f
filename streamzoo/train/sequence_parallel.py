"""Sequence parallelism for diagonal linear recurrences `h_t = a_t * h_{t-1} + b_t` (LASP-2 style).

The time axis is split into contiguous blocks over a mesh axis. Because the recurrence is
linear, block i's states are its states from a zero start plus the incoming state carried
through the block's decays:

    h_t = h_t^local + (a_{t0} ... a_t) * h_in(i)

So each device (1) scans its block from zero (`linear_scan`), (2) all-gathers every block's
summary `(prod a, last local state)` — one small collective, the same for every device,
instead of a chain of point-to-point handoffs — (3) folds the summaries of the blocks
before it into its incoming state, and (4) corrects its local states. The result equals the
single-device scan; the work per device is `T / n` plus `n` tiny folds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from streamzoo.layers.linear_recurrence import linear_scan


def _check(a, b, h0, mask, mesh, axis):
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a, b: expected equal shapes [B, T, ...], got {a.shape} and {b.shape}")
    state = a.shape[:1] + a.shape[2:]
    if h0 is not None and h0.shape != state:
        raise ValueError(f"h0: expected shape {state} (a without its time axis), "
                         f"got {h0.shape}")
    if mask is not None and (mask.shape != a.shape[:2] or mask.dtype != jnp.bool_):
        raise ValueError(f"mask: expected bool {list(a.shape[:2])}, "
                         f"got {mask.dtype}{list(mask.shape)}")
    if not isinstance(mesh, Mesh) or axis not in mesh.shape:
        raise ValueError(f"axis: expected a mesh axis of {getattr(mesh, 'shape', mesh)}, "
                         f"got {axis!r}")
    if a.shape[1] % mesh.shape[axis]:
        raise ValueError(f"a: sequence length T={a.shape[1]} must be a multiple of the "
                         f"'{axis}' axis size {mesh.shape[axis]}")


def sequence_parallel_scan(a, b, h0=None, *, mesh: Mesh, axis: str = "seq", mask=None,
                           batch_axis: str | None = None):
    """`h_t = a_t * h_{t-1} + b_t` along axis 1 of `[B, T, ...]` with T split over `axis`.

    `h0 [B, ...]` is the state before the first frame (zeros if None). A frame whose `mask`
    is False is an identity (`a = 1, b = 0`), as in `LinearRecurrence`. `batch_axis`
    optionally splits B over another mesh axis. Computes in float32 and returns
    `(h [B, T, ...], h_last [B, ...])` like `linear_scan`.
    """
    _check(a, b, h0, mask, mesh, axis)
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    if mask is not None:
        keep = mask.reshape(mask.shape + (1,) * (a.ndim - 2))
        a = jnp.where(keep, a, 1.0)
        b = jnp.where(keep, b, 0.0)
    h0 = jnp.zeros(a.shape[:1] + a.shape[2:], jnp.float32) if h0 is None else h0.astype(jnp.float32)

    def local(a, b, h0):
        me = jax.lax.axis_index(axis)
        h_local, h_end = linear_scan(a, b, jnp.zeros_like(h0))
        decay = jax.lax.associative_scan(jnp.multiply, a, axis=1)  # a_{t0} ... a_t
        # Every block's summary, [n, B, ...], the same on every device ("invarying": typed as
        # not varying over `axis`, so the fold below and h_last need no further collective).
        decays = jax.lax.all_gather(decay[:, -1], axis, to="invarying")
        ends = jax.lax.all_gather(h_end, axis, to="invarying")

        def fold(h, summary):
            block_decay, block_end = summary
            h = block_decay * h + block_end
            return h, h

        h_last, after = jax.lax.scan(fold, h0, (decays, ends))
        before = jnp.concatenate([h0[None], after[:-1]], axis=0)  # state entering each block
        h_in = jax.lax.dynamic_index_in_dim(before, me, axis=0, keepdims=False)
        return h_local + decay * h_in[:, None], h_last

    seq_spec = P(batch_axis, axis)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(seq_spec, seq_spec, P(batch_axis)),
                           out_specs=(seq_spec, P(batch_axis)))
    return mapped(a, b, h0)


__all__ = ["sequence_parallel_scan"]
