"""Streaming self-attention over a sliding window, with attention sinks, look-ahead and
pluggable KV-cache policies.

Query at logical position p sees key k (both positions of the same row's committed frames)
when `k <= p + max_future` and either `k >= p - max_past` (the window) or `k < num_sinks`
(the first frames of the stream, kept forever). `max_past=None` is full causal attention
(offline only: streaming it would need an unbounded cache).

Offline (`__call__`) applies that position mask to the whole compacted sequence. Streaming
(`step`) keeps keys and values in a per-row cache of `num_sinks` reserved sink slots plus a
ring of `S = max_past + max_future` slots, each tagged with the absolute position it holds,
so the same position mask applies to cached keys and cached decode equals recompute. A chunk
is processed as "attend to (cache ++ chunk keys), then write the chunk's newest keys into the
ring", which works for any chunk length, also longer than the ring.

`policy=` (see `streamzoo.layers.kv_policies`) replaces `max_past`/`num_sinks` by a KV-cache
policy: full cache up to a maximum, sliding window, sinks + window with StreamingLLM cache
positions, or one policy per KV head (DuoAttention). Heads are then split into cache groups,
each with its own cache (arrays in the carry become tuples, one per group, when there are
several). Without a policy the layer is one group with `"absolute"` positions: keys are stored
RoPE-rotated by the position they were written at.

With `max_future = F > 0` the look-ahead is peeked, not committed: the query of frame p waits
(projected, in the carry) until frame p + F arrives, so `input_latency = output_latency = F`,
and `flush` answers the waiting queries with the keys that exist. The ring must then hold
keys back to `p - max_past` for the oldest waiting query `p = pos - F`, hence `S = max_past + F`.

`max_rollback = n` adds n spare ring slots so that `rollback(carry, count)` can un-commit up to
n frames exactly (speculative decoding rejects draft tokens this way).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.kv_policies import (CacheGroup, KVPolicy, assemble_keys, legacy_group,
                                          rollback_cache, take_rows, write_cache)
from streamzoo.layers.positional import apply_rope
from streamzoo.pallas_kernels.attention import attention as masked_attention
from streamzoo.pallas_kernels.ring_decode_attention import ring_decode_attention


# ------------------------------------------------------------------------------ reference
def attention_mask(q_pos, k_pos, k_valid, max_past, max_future, num_sinks):
    """`[B, Tq, Tk]` bool: which keys each query may see (the position rule above)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    visible = k_valid[:, None, :] & (kp <= qp + max_future)
    if max_past is not None:
        visible &= (kp >= qp - max_past) | (kp < num_sinks)
    return visible


def attention_reference(q, k, v, q_pos, k_pos, k_valid, max_past, max_future, num_sinks, *,
                        scale=None, q_for_sinks=None):
    """Masked multi-/grouped-query attention in plain jnp (the reference for kernels).

    q `[B, Tq, H, Dh]`, k and v `[B, Tk, Hkv, Dh]` (H a multiple of Hkv), absolute positions
    `q_pos [B, Tq]`, `k_pos [B, Tk]` int, `k_valid [B, Tk]` bool. Keys may come in any order.
    `q_for_sinks` (optional, like q): the queries scored against the first `num_sinks` keys,
    which must then be the sink keys (StreamingLLM cache positions rotate a query differently
    for sinks). Scores and softmax in float32; a query that sees no key gets a zero output
    (never NaN, also in gradients). Returns `[B, Tq, H, Dh]` in q's dtype.
    """
    batch, tq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    groups = heads // kv_heads
    qg = q.astype(jnp.float32).reshape(batch, tq, kv_heads, groups, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    if q_for_sinks is not None and num_sinks:
        qs = q_for_sinks.astype(jnp.float32).reshape(batch, tq, kv_heads, groups, head_dim)
        sink = jnp.einsum("bqhgd,bkhd->bhgqk", qs, k[:, :num_sinks].astype(jnp.float32)) * scale
        scores = jnp.concatenate([sink, scores[..., sink.shape[-1]:]], axis=-1)
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
    slots `num_sinks + r` form the ring (position p lives in ring slot `p % S`). Under a
    per-head policy with several cache groups, `k`, `v` and `slot_pos` are tuples (one entry
    per group, in `StreamingAttention.groups` order)."""

    k: jax.Array         # [B, num_sinks + S, Hkv, Dh] keys (RoPE-rotated in "absolute" mode)
    v: jax.Array         # [B, num_sinks + S, Hkv, Dh]
    slot_pos: jax.Array  # [B, num_sinks + S] int32 absolute position held, -1 = empty
    pos: jax.Array       # [B] int32 committed frames (the next frame's logical position)
    queries: jax.Array | None  # [B, F, H, Dh] projected (un-rotated) queries of pos-F..pos-1


# ---------------------------------------------------------------------------------- layer
_REQUIRED = object()


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

    The cache rule is either `max_past` (+ `num_sinks`, absolute positions) or `policy` (a
    `KVPolicy`), not both. `step` needs a bounded window (raises a ValueError otherwise).
    `receptive_field` is `(-max_past, max_future)`, with past `-inf` when a group is unbounded
    or has sinks: sinks let every output see frames `0..num_sinks-1`, however far back.
    """

    def __init__(self, features: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, max_past: int | None = _REQUIRED,
                 max_future: int = 0, num_sinks: int = 0, policy: KVPolicy | None = None,
                 max_rollback: int = 0, rope: bool = True, rope_base: float = 10000.0,
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
        _check_int("max_future", max_future, 0)
        _check_int("num_sinks", num_sinks, 0)
        _check_int("max_rollback", max_rollback, 0)
        if policy is None:
            if max_past is _REQUIRED:
                raise ValueError("max_past: expected an int or None (or pass policy=...), got "
                                 "neither")
            _check_int("max_past", max_past, 0, allow_none=True)
            groups = (legacy_group(int(num_kv_heads), None if max_past is None else int(max_past),
                                   int(num_sinks)),)
        else:
            if not isinstance(policy, KVPolicy):
                raise ValueError(f"policy: expected a KVPolicy (streamzoo.layers.kv_policies), "
                                 f"got {type(policy).__name__}")
            if max_past is not _REQUIRED or num_sinks:
                raise ValueError(f"policy: pass either policy or max_past/num_sinks, got policy="
                                 f"{policy} and max_past={max_past if max_past is not _REQUIRED else None}, "
                                 f"num_sinks={num_sinks}")
            groups = policy.groups(int(num_kv_heads))
        if max_rollback and max_future:
            raise ValueError(f"max_rollback: rollback needs max_future=0, got max_future={max_future}")
        if rope:
            if head_dim % 2:
                raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
            if not (isinstance(rope_base, numbers.Real) and rope_base > 0):
                raise ValueError(f"rope_base: expected a positive number, got {rope_base!r}")
        features, num_heads, num_kv_heads, head_dim = map(
            int, (features, num_heads, num_kv_heads, head_dim))
        self.in_features = self.out_features = features
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.policy = policy
        self.groups: tuple[CacheGroup, ...] = tuple(groups)
        pasts = [g.max_past for g in self.groups]
        # The widest group's reach (the only group's, without a per-head policy).
        self.max_past = None if None in pasts else max(pasts)
        self.num_sinks = max(g.num_sinks for g in self.groups)
        self.max_future, self.max_rollback = int(max_future), int(max_rollback)
        self.rope, self.rope_base = bool(rope), float(rope_base)
        self.dtype = dtype
        self.qkv = nnx.Linear(features, (num_heads + 2 * num_kv_heads) * head_dim,
                              use_bias=use_bias, rngs=rngs)
        self.out = nnx.Linear(num_heads * head_dim, features, use_bias=use_bias, rngs=rngs)

    # ------------------------------------------------------------------------- facts
    @property
    def ring_size(self) -> int:
        """Ring slots S = max_past + max_future + max_rollback (at least 1), excluding the
        sink slots (the largest group's under a per-head policy)."""
        return max(self.ring_sizes)

    @property
    def ring_sizes(self) -> tuple[int, ...]:
        """Ring slots per cache group."""
        self._require_window("ring_size")
        return tuple(g.ring_size(self.max_future, self.max_rollback) for g in self.groups)

    @property
    def spec(self) -> StreamSpec:
        unbounded = self.max_past is None or self.num_sinks > 0
        past = -math.inf if unbounded else -float(self.max_past)
        return StreamSpec(input_latency=self.max_future, output_latency=self.max_future,
                          receptive_field=(past, float(self.max_future)))

    def _require_window(self, what):
        if any(g.max_past is None for g in self.groups):
            raise ValueError(
                f"max_past: {what} needs a bounded window (an int), got None; streaming "
                "full causal attention would need an unbounded KV cache")

    # ----------------------------------------------------------------------- pieces
    def _project_raw(self, values):
        """Un-rotated q `[B,T,H,Dh]`, k and v `[B,T,Hkv,Dh]` in values' dtype."""
        batch, length = values.shape[:2]
        h, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = _linear(self.qkv, values)
        q, k, v = jnp.split(qkv, [h * dh, (h + hkv) * dh], axis=-1)
        return (q.reshape(batch, length, h, dh), k.reshape(batch, length, hkv, dh),
                v.reshape(batch, length, hkv, dh))

    def _rotate(self, x, positions):
        return apply_rope(x, positions, base=self.rope_base) if self.rope else x

    def _project(self, values, positions):
        """q and k rotated by absolute `positions`, and v (the "absolute" mode's stored form)."""
        q, k, v = self._project_raw(values)
        return self._rotate(q, positions), self._rotate(k, positions), v

    def _head_index(self, group: CacheGroup, kind: str):
        """Static head indices of a group (`None` when it holds all heads in order)."""
        if group.kv_heads == tuple(range(self.num_kv_heads)):
            return None
        if kind == "kv":
            return np.asarray(group.kv_heads)
        per = self.num_heads // self.num_kv_heads
        return np.asarray([kv * per + i for kv in group.kv_heads for i in range(per)])

    def _heads(self, group, kind, x):
        idx = self._head_index(group, kind)
        return x if idx is None else jnp.take(x, idx, axis=2)

    def _merge_heads(self, outs):
        """Per-group outputs `[B, T, H_g, Dh]` back into head order `[B, T, H, Dh]`."""
        if len(outs) == 1:
            return outs[0]
        order = np.concatenate([self._head_index(g, "q") for g in self.groups])
        return jnp.take(jnp.concatenate(outs, axis=2), np.argsort(order), axis=2)

    def _attend_group(self, group, q, keys, vals, q_pos, key_pos, key_valid, dtype):
        """One group's attention of un-rotated queries over keys in the group's stored form
        (sinks first, see `kv_policies.assemble_keys`), RoPE per the group's positions."""
        s, q_sinks = group.num_sinks, None
        if group.positions == "absolute" or not self.rope:
            q = self._rotate(q, q_pos)
        else:  # cache positions, relative to a per-row base: angles stay bounded
            base = jnp.maximum(0, q_pos.min(axis=1, keepdims=True) - s - group.max_past)
            sink_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), key_pos[:, :s].shape)
            keys = jnp.concatenate([self._rotate(keys[:, :s], sink_pos),
                                    self._rotate(keys[:, s:], key_pos[:, s:] - base)], axis=1)
            if s:
                q_sinks = self._rotate(q, q_pos - group.sink_shift(q_pos)).astype(dtype)
            q = self._rotate(q, q_pos - base)
        # The kernel dispatcher picks Pallas on GPU/TPU and the jnp reference on the CPU.
        return ring_decode_attention(q.astype(dtype), keys.astype(dtype), vals.astype(dtype),
                                     jnp.where(key_valid, key_pos, -1), q_pos,
                                     max_past=group.max_past, max_future=self.max_future,
                                     num_sinks=s, q_sinks=q_sinks, impl="auto")

    def _attend(self, q, k, v, q_pos, k_pos, k_valid):
        """Rotated queries over rotated keys, one group holding all heads (no policy)."""
        group = self.groups[0]
        return attention_reference(q, k, v, q_pos, k_pos, k_valid, group.max_past,
                                   self.max_future, group.num_sinks)

    def _output(self, o, mask):
        batch, length = o.shape[:2]
        y = _linear(self.out, o.reshape(batch, length, self.num_heads * self.head_dim))
        return Seq(y, mask, compact=True).masked()

    def _caches(self, carry):
        """`[(k, v, slot_pos)]` per group."""
        if len(self.groups) == 1:
            return [(carry.k, carry.v, carry.slot_pos)]
        return list(zip(carry.k, carry.v, carry.slot_pos))

    def _pack(self, caches, pos, queries):
        k, v, slot_pos = (tuple(c[i] for c in caches) for i in range(3))
        if len(self.groups) == 1:
            k, v, slot_pos = k[0], v[0], slot_pos[0]
        return AttentionCarry(k, v, slot_pos, pos, queries)

    # ------------------------------------------------------------------------ paths
    def _init_carry(self, batch_size, dtype):
        self._require_window("init_carry")
        dtype = dtype or self.dtype or jnp.float32
        caches = []
        for group, ring in zip(self.groups, self.ring_sizes):
            slots = group.num_sinks + ring
            kv_shape = (batch_size, slots, len(group.kv_heads), self.head_dim)
            caches.append((jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype),
                           jnp.full((batch_size, slots), -1, jnp.int32)))
        queries = None
        if self.max_future:
            queries = jnp.zeros((batch_size, self.max_future, self.num_heads, self.head_dim),
                                dtype)
        return self._pack(caches, jnp.zeros((batch_size,), jnp.int32), queries)

    def _forward(self, x: Seq) -> Seq:
        values = x.values.astype(self.dtype or x.dtype)
        positions = jnp.broadcast_to(jnp.arange(x.length, dtype=jnp.int32), x.mask.shape)
        q_raw, k_raw, v = self._project_raw(values)
        q, k = self._rotate(q_raw, positions), self._rotate(k_raw, positions)
        outs = []
        for group in self.groups:
            q_sinks = None
            if self.rope and group.positions == "cache" and group.num_sinks:
                q_sinks = self._rotate(self._heads(group, "q", q_raw),
                                       positions - group.sink_shift(positions))
            qg = self._heads(group, "q", q)
            outs.append(masked_attention(   # Pallas on GPU/TPU, the jnp reference on the CPU
                qg, self._heads(group, "kv", k), self._heads(group, "kv", v),
                lengths=x.lengths(), max_past=group.max_past, max_future=self.max_future,
                num_sinks=group.num_sinks,
                q_sinks=None if q_sinks is None else q_sinks.astype(qg.dtype), impl="auto"))
        return self._output(self._merge_heads(outs), x.mask)

    def _step(self, carry: AttentionCarry, x: Seq):
        self._require_window("step")
        length, future = x.length, self.max_future
        cache_dtype = self._caches(carry)[0][0].dtype
        compute_dtype = self.dtype or x.dtype
        count = x.lengths()
        start, end = carry.pos, carry.pos + count
        frames = jnp.arange(length, dtype=jnp.int32)
        chunk_pos = start[:, None] + frames
        q, k, v = self._project_raw(x.values.astype(compute_dtype))
        if future:
            # Waiting ++ new queries: index j is position start - F + j. Emit those whose
            # look-ahead is now complete, skipping the never-existing negative positions.
            waiting = jnp.concatenate([carry.queries, q.astype(cache_dtype)], axis=1)
            first = jnp.maximum(0, future - start)
            idx = first[:, None] + frames
            q_emit = take_rows(waiting, idx)
            q_pos = start[:, None] - future + idx
            out_mask = idx < count[:, None]
            queries = take_rows(waiting, count[:, None] + jnp.arange(future))
        else:
            q_emit, q_pos, out_mask, queries = q, chunk_pos, frames < count[:, None], None

        # Per group: attend to (sinks ++ ring ++ chunk), then write the chunk into the cache.
        outs, caches = [], []
        for group, (ck, cv, sp) in zip(self.groups, self._caches(carry)):
            kg = self._heads(group, "kv", k)
            if group.positions == "absolute":
                kg = self._rotate(kg, chunk_pos)
            kg, vg = kg.astype(cache_dtype), self._heads(group, "kv", v).astype(cache_dtype)
            keys, vals, key_pos, key_valid = assemble_keys(ck, cv, sp, kg, vg, chunk_pos, count,
                                                           start, group.num_sinks)
            outs.append(self._attend_group(group, self._heads(group, "q", q_emit), keys, vals,
                                           q_pos, key_pos, key_valid, compute_dtype))
            caches.append(write_cache(ck, cv, sp, kg, vg, chunk_pos, start, end, group.num_sinks))
        return self._pack(caches, end, queries), self._output(self._merge_heads(outs), out_mask)

    def _flush(self, carry: AttentionCarry, batch_size):
        """Answer the waiting queries with the keys that exist; the carry is unchanged (the
        stream is over: `reset_rows` to reuse a row). Computes in `dtype` or the cache dtype."""
        future = self.max_future
        if not future:
            return super()._flush(carry, batch_size)
        caches = self._caches(carry)
        compute_dtype = self.dtype or caches[0][0].dtype
        first = jnp.maximum(0, future - carry.pos)
        idx = jnp.minimum(first[:, None] + jnp.arange(future), future - 1)
        q = take_rows(carry.queries, idx)
        q_pos = carry.pos[:, None] - future + idx
        out_mask = jnp.arange(future)[None, :] < (future - first)[:, None]
        none = jnp.zeros((batch_size,), jnp.int32)
        outs = []
        for group, (ck, cv, sp) in zip(self.groups, caches):
            empty = jnp.zeros((batch_size, 0) + ck.shape[2:], ck.dtype)
            keys, vals, key_pos, key_valid = assemble_keys(
                ck, cv, sp, empty, empty, jnp.zeros((batch_size, 0), jnp.int32), none,
                carry.pos, group.num_sinks)
            outs.append(self._attend_group(group, self._heads(group, "q", q), keys, vals, q_pos,
                                           key_pos, key_valid, compute_dtype))
        return carry, self._output(self._merge_heads(outs), out_mask)

    # --------------------------------------------------------------------- rollback
    def rollback(self, carry: AttentionCarry, count) -> AttentionCarry:
        """Un-commit the last `count[b]` frames of each row (`[B]` int, clipped to the frames
        committed). Exact for `count <= max_rollback`: the spare ring slots still hold every
        key a later query can see; rolling back further leaves holes in the window."""
        if self.max_future:
            raise ValueError(f"max_future: rollback needs max_future=0, got {self.max_future}")
        count = jnp.asarray(count)
        batch = carry.pos.shape[0]
        if count.shape != (batch,) or not jnp.issubdtype(count.dtype, jnp.integer):
            raise ValueError(f"count: expected an int array of shape ({batch},), got "
                             f"{count.dtype}{list(count.shape)}")
        self.check_carry(carry, batch)
        new_pos = carry.pos - jnp.clip(count.astype(jnp.int32), 0, carry.pos)
        caches = [(ck, cv, rollback_cache(sp, new_pos)) for ck, cv, sp in self._caches(carry)]
        return self._pack(caches, new_pos, carry.queries)


def _take(values, idx):
    """Per row b: `values[b, idx[b]]` along axis 1."""
    return take_rows(values, idx)


def _linear(layer: nnx.Linear, v):
    """An `nnx.Linear` applied in the dtype of `v` (parameters stay float32)."""
    y = v @ layer.kernel[...].astype(v.dtype)
    if layer.bias is not None:
        y = y + layer.bias[...].astype(v.dtype)
    return y
