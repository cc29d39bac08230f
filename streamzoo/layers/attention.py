"""Streaming self-attention over a sliding window, with attention sinks and look-ahead.

Query at logical position p sees key k (both positions of the same row's committed frames)
when `k <= p + max_future` and either `k >= p - max_past` (the window) or `k < num_sinks`
(the first frames of the stream, kept forever). `max_past=None` is full causal attention
(offline only: streaming it would need an unbounded cache).

Offline (`__call__`) applies that position mask to the whole compacted sequence. Streaming
(`step`) keeps RoPE-rotated keys and values in a per-row cache of `num_sinks` reserved sink
slots plus a ring of `S = max_past + max_future` slots, each tagged with the absolute position
it holds, so the same position mask applies to cached keys and cached decode equals
recompute. A chunk is processed as "attend to (cache ++ chunk keys), then write the chunk's
newest keys into the ring", which works for any chunk length, also longer than the ring.

With `max_future = F > 0` the look-ahead is peeked, not committed: the query of frame p waits
(rotated, in the carry) until frame p + F arrives, so `input_latency = output_latency = F`,
and `flush` answers the waiting queries with the keys that exist. The ring must then hold
keys back to `p - max_past` for the oldest waiting query `p = pos - F`, hence `S = max_past + F`.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.positional import apply_rope


# ------------------------------------------------------------------------------ reference
def attention_mask(q_pos, k_pos, k_valid, max_past, max_future, num_sinks):
    """`[B, Tq, Tk]` bool: which keys each query may see (the position rule above)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    visible = k_valid[:, None, :] & (kp <= qp + max_future)
    if max_past is not None:
        visible &= (kp >= qp - max_past) | (kp < num_sinks)
    return visible


def attention_reference(q, k, v, q_pos, k_pos, k_valid, max_past, max_future, num_sinks, *,
                        scale=None):
    """Masked multi-/grouped-query attention in plain jnp (the reference for kernels).

    q `[B, Tq, H, Dh]`, k and v `[B, Tk, Hkv, Dh]` (H a multiple of Hkv), absolute positions
    `q_pos [B, Tq]`, `k_pos [B, Tk]` int, `k_valid [B, Tk]` bool. Keys may come in any order.
    Scores and softmax in float32; a query that sees no key gets a zero output (never NaN,
    also in gradients). Returns `[B, Tq, H, Dh]` in q's dtype.
    """
    batch, tq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    groups = heads // kv_heads
    qg = q.astype(jnp.float32).reshape(batch, tq, kv_heads, groups, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    mask = attention_mask(q_pos, k_pos, k_valid, max_past, max_future, num_sinks)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    top = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v.astype(jnp.float32))
    return out.reshape(batch, tq, heads, head_dim).astype(q.dtype)


# ---------------------------------------------------------------------------------- carry
@struct.dataclass
class AttentionCarry:
    """Per-row KV cache: slots `[0, num_sinks)` hold the sink frames (slot s = position s),
    slots `num_sinks + r` form the ring (position p lives in ring slot `p % S`)."""

    k: jax.Array         # [B, num_sinks + S, Hkv, Dh] RoPE-rotated keys, cache dtype
    v: jax.Array         # [B, num_sinks + S, Hkv, Dh]
    slot_pos: jax.Array  # [B, num_sinks + S] int32 absolute position held, -1 = empty
    pos: jax.Array       # [B] int32 committed frames (the next frame's logical position)
    queries: jax.Array | None  # [B, F, H, Dh] rotated queries of frames pos-F..pos-1 (F > 0)


# ---------------------------------------------------------------------------------- layer
def _check_int(name, value, minimum, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}: expected {kind}, got {value!r}")


class StreamingAttention(StreamLayer):
    """Self-attention (MHA or GQA) with a sliding window, sinks, look-ahead and RoPE.

    `features` in and out; `num_heads` query heads of size `head_dim` (default
    `features // num_heads`), `num_kv_heads` key/value heads (default `num_heads`; GQA when
    fewer). Q, K and V come from one fused projection. Parameters are float32; compute runs
    in `dtype` or the input's dtype, the cache in `init_carry`'s dtype.

    `step` needs `max_past` set (raises a ValueError otherwise). `receptive_field` is
    `(-max_past, max_future)`, with past `-inf` when `max_past is None` or `num_sinks > 0`:
    sinks let every output see frames `0..num_sinks-1`, however far back they are.
    """

    def __init__(self, features: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, max_past: int | None, max_future: int = 0,
                 num_sinks: int = 0, rope: bool = True, rope_base: float = 10000.0,
                 use_bias: bool = False, dtype=None, rngs: nnx.Rngs):
        _check_int("features", features, 1)
        _check_int("num_heads", num_heads, 1)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_int("num_kv_heads", num_kv_heads, 1)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        if head_dim is None:
            if features % num_heads:
                raise ValueError(
                    f"head_dim: features={features} is not divisible by num_heads={num_heads}; "
                    "pass head_dim explicitly")
            head_dim = features // num_heads
        _check_int("head_dim", head_dim, 1)
        _check_int("max_past", max_past, 0, allow_none=True)
        _check_int("max_future", max_future, 0)
        _check_int("num_sinks", num_sinks, 0)
        if rope:
            if head_dim % 2:
                raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
            if not (isinstance(rope_base, numbers.Real) and rope_base > 0):
                raise ValueError(f"rope_base: expected a positive number, got {rope_base!r}")
        features, num_heads, num_kv_heads, head_dim = map(
            int, (features, num_heads, num_kv_heads, head_dim))
        self.in_features = self.out_features = features
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.max_past = None if max_past is None else int(max_past)
        self.max_future, self.num_sinks = int(max_future), int(num_sinks)
        self.rope, self.rope_base = bool(rope), float(rope_base)
        self.dtype = dtype
        self.qkv = nnx.Linear(features, (num_heads + 2 * num_kv_heads) * head_dim,
                              use_bias=use_bias, rngs=rngs)
        self.out = nnx.Linear(num_heads * head_dim, features, use_bias=use_bias, rngs=rngs)

    # ------------------------------------------------------------------------- facts
    @property
    def ring_size(self) -> int:
        """Ring slots S = max_past + max_future (at least 1), excluding the sink slots."""
        self._require_window("ring_size")
        return max(1, self.max_past + self.max_future)

    @property
    def spec(self) -> StreamSpec:
        unbounded = self.max_past is None or self.num_sinks > 0
        past = -math.inf if unbounded else -float(self.max_past)
        return StreamSpec(input_latency=self.max_future, output_latency=self.max_future,
                          receptive_field=(past, float(self.max_future)))

    def _require_window(self, what):
        if self.max_past is None:
            raise ValueError(
                f"max_past: {what} needs a bounded window (an int), got None; streaming "
                "full causal attention would need an unbounded KV cache")

    # ----------------------------------------------------------------------- pieces
    def _project(self, values, positions):
        """Rotated q `[B,T,H,Dh]`, rotated k and v `[B,T,Hkv,Dh]` in values' dtype."""
        batch, length = values.shape[:2]
        h, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = _linear(self.qkv, values)
        q, k, v = jnp.split(qkv, [h * dh, (h + hkv) * dh], axis=-1)
        q = q.reshape(batch, length, h, dh)
        k = k.reshape(batch, length, hkv, dh)
        v = v.reshape(batch, length, hkv, dh)
        if self.rope:
            q = apply_rope(q, positions, base=self.rope_base)
            k = apply_rope(k, positions, base=self.rope_base)
        return q, k, v

    def _attend(self, q, k, v, q_pos, k_pos, k_valid):
        """The core attend: one function of (q, k, v, positions, validity)."""
        return attention_reference(q, k, v, q_pos, k_pos, k_valid, self.max_past,
                                   self.max_future, self.num_sinks)

    def _output(self, o, mask):
        batch, length = o.shape[:2]
        y = _linear(self.out, o.reshape(batch, length, self.num_heads * self.head_dim))
        return Seq(y, mask, compact=True).masked()

    def _cached_key_valid(self, carry):
        """Cached keys' validity: sink slots once written, ring slots past the sinks (the
        ring may still hold a copy of a sink frame; the sink slot is the one that counts)."""
        slots = jnp.arange(carry.slot_pos.shape[1])
        return jnp.where(slots < self.num_sinks, carry.slot_pos >= 0,
                         carry.slot_pos >= self.num_sinks)

    # ------------------------------------------------------------------------ paths
    def _init_carry(self, batch_size, dtype):
        self._require_window("init_carry")
        dtype = dtype or self.dtype or jnp.float32
        slots = self.num_sinks + self.ring_size
        kv_shape = (batch_size, slots, self.num_kv_heads, self.head_dim)
        queries = None
        if self.max_future:
            queries = jnp.zeros((batch_size, self.max_future, self.num_heads, self.head_dim),
                                dtype)
        return AttentionCarry(jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype),
                              jnp.full((batch_size, slots), -1, jnp.int32),
                              jnp.zeros((batch_size,), jnp.int32), queries)

    def _forward(self, x: Seq) -> Seq:
        values = x.values.astype(self.dtype or x.dtype)
        positions = jnp.broadcast_to(jnp.arange(x.length, dtype=jnp.int32), x.mask.shape)
        q, k, v = self._project(values, positions)
        o = self._attend(q, k, v, positions, positions, x.mask)
        return self._output(o, x.mask)

    def _step(self, carry: AttentionCarry, x: Seq):
        self._require_window("step")
        length, future, sinks = x.length, self.max_future, self.num_sinks
        ring, cache_dtype = self.ring_size, carry.k.dtype
        compute_dtype = self.dtype or x.dtype
        count = x.lengths()
        start, end = carry.pos, carry.pos + count
        frames = jnp.arange(length, dtype=jnp.int32)
        chunk_pos = start[:, None] + frames
        q, k, v = self._project(x.values.astype(compute_dtype), chunk_pos)

        # Attend to (cache ++ chunk): every key a query emitted now can need is in there.
        keys = jnp.concatenate([carry.k, k.astype(cache_dtype)], axis=1)
        vals = jnp.concatenate([carry.v, v.astype(cache_dtype)], axis=1)
        key_pos = jnp.concatenate([carry.slot_pos, chunk_pos], axis=1)
        key_valid = jnp.concatenate([self._cached_key_valid(carry), frames < count[:, None]],
                                    axis=1)
        if future:
            # Waiting ++ new queries: index j is position start - F + j. Emit those whose
            # look-ahead is now complete, skipping the never-existing negative positions.
            waiting = jnp.concatenate([carry.queries, q.astype(cache_dtype)], axis=1)
            first = jnp.maximum(0, future - start)
            idx = first[:, None] + frames
            q_emit = _take(waiting, idx)
            q_pos = start[:, None] - future + idx
            out_mask = idx < count[:, None]
            queries = _take(waiting, count[:, None] + jnp.arange(future))
        else:
            q_emit, q_pos, out_mask, queries = q, chunk_pos, frames < count[:, None], None
        o = self._attend(q_emit.astype(compute_dtype), keys.astype(compute_dtype),
                         vals.astype(compute_dtype), q_pos, key_pos, key_valid)

        # Then write, as a gather: each slot pulls the newest committed frame it is meant to
        # hold from (cache ++ chunk). Uncommitted frames lie past `end` and are never pulled,
        # and a chunk longer than the ring leaves only its last S frames; no scatter needed.
        slots = jnp.arange(sinks + ring, dtype=jnp.int32)
        end1 = end[:, None] - 1
        newest = end1 - jnp.mod(end1 - (slots - sinks), ring)      # ring slot r: p % S == r
        target = jnp.where(slots < sinks, slots, newest)            # sink slot s: position s
        from_chunk = (target >= start[:, None]) & (target < end[:, None])
        src = jnp.where(from_chunk, sinks + ring + target - start[:, None], slots)
        new = AttentionCarry(_take(keys, src), _take(vals, src),
                             jnp.take_along_axis(key_pos, src, axis=1), end, queries)
        return new, self._output(o, out_mask)

    def _flush(self, carry: AttentionCarry, batch_size):
        """Answer the waiting queries with the keys that exist; the carry is unchanged (the
        stream is over: `reset_rows` to reuse a row). Computes in `dtype` or the cache dtype."""
        future = self.max_future
        if not future:
            return super()._flush(carry, batch_size)
        compute_dtype = self.dtype or carry.k.dtype
        first = jnp.maximum(0, future - carry.pos)
        idx = jnp.minimum(first[:, None] + jnp.arange(future), future - 1)
        q = _take(carry.queries, idx)
        q_pos = carry.pos[:, None] - future + idx
        out_mask = jnp.arange(future)[None, :] < (future - first)[:, None]
        o = self._attend(q.astype(compute_dtype), carry.k.astype(compute_dtype),
                         carry.v.astype(compute_dtype), q_pos, carry.slot_pos,
                         self._cached_key_valid(carry))
        return carry, self._output(o, out_mask)


def _take(values, idx):
    """Per row b: `values[b, idx[b]]` along axis 1."""
    idx = idx.reshape(idx.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, idx, axis=1)


def _linear(layer: nnx.Linear, v):
    """An `nnx.Linear` applied in the dtype of `v` (parameters stay float32)."""
    y = v @ layer.kernel[...].astype(v.dtype)
    if layer.bias is not None:
        y = y + layer.bias[...].astype(v.dtype)
    return y
