"""KV-cache policies for `StreamingAttention`: which past keys a query keeps, and at which
positions RoPE sees them.

A policy splits the layer's KV heads into *cache groups*. Per row, a group keeps `num_sinks`
sink slots (the first frames of the stream, kept forever) plus a ring of its newest frames,
and a query at logical position p sees the group's keys k with `k < num_sinks` or
`p - max_past <= k <= p + max_future` (`max_future` is the layer's look-ahead, 0 for an LM):

* `FullCache(max_cache)`: the newest `max_cache` past frames. Exactly full causal attention
  for streams of up to `max_cache + 1` frames; after that the oldest frames are evicted (it
  becomes a window of `max_cache`), so size it to the longest stream you serve.
* `SlidingWindow(window)`: the newest `window` past frames (plus the current one).
* `SinksWindow(num_sinks, window)`: StreamingLLM's attention sinks plus the window.
* `PerHead(policies)`: one policy per KV head. Heads with equal policies share a group and each
  group has its own cache size, so a streaming head costs only its window.
  `duo_attention(retrieval, ...)` builds DuoAttention's split: retrieval heads keep a full
  cache up to `max_cache`, streaming heads keep sinks + window.

Positions, chosen per policy with `positions=`:

* `"absolute"`: a key keeps the position it was written at, and is stored already rotated.
  Seen from query p, sink j is at distance `p - j`, which grows without bound: a model trained
  on contexts of C frames meets distances it never saw once `p >= C`, and float32 RoPE angles
  lose precision at large p.
* `"cache"` (StreamingLLM): positions are assigned by place in the cache. Query p's kept set
  `K(p) = sinks + window` is laid out in order at positions `0 .. |K(p)| - 1`, the query
  last. Window keys are contiguous, so their distances stay `p - k`; only sinks move: sink j
  is at distance `q_c(p) - j` with `q_c(p) = p - shift(p)` and
  `shift(p) = max(0, p - num_sinks - max_past)`, never more than `num_sinks + max_past`.
  Keys are stored un-rotated and RoPE is applied at attention time, relative to a per-row base
  (`shift` of the chunk's first query), so angles stay bounded however long the stream. In a
  one-token decode step these are exactly the cache-slot positions `0 .. |K(p)| - 1`.

For policies without sinks the two modes give the same attention (up to float rounding). Both
are a mask plus a position rule, so the offline call computes what cached decode computes, for
any chunking: the streaming contract holds for every policy. A paged layout (page pool + page
table) is a decode-time structure of the LM decode loop: `streamzoo.zoo.lm.paged`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence

import jax.numpy as jnp

POSITION_MODES = ("absolute", "cache")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_positions(positions):
    if positions not in POSITION_MODES:
        raise ValueError(f"positions: expected one of {POSITION_MODES}, got {positions!r}")


# -------------------------------------------------------------------------------- groups
@dataclasses.dataclass(frozen=True)
class CacheGroup:
    """KV heads sharing one cache rule: `num_sinks` sink slots + a ring over `max_past` past
    frames (`None`: unbounded, offline only), positions `"absolute"` or `"cache"`."""

    kv_heads: tuple[int, ...]
    max_past: int | None
    num_sinks: int
    positions: str

    def ring_size(self, max_future: int = 0, max_rollback: int = 0) -> int:
        """Ring slots: the window, the look-ahead and the spare slots that make rollback exact."""
        return max(1, self.max_past + max_future + max_rollback)

    def sink_shift(self, q_pos):
        """`shift(p)` of the module docstring (0 without sinks or in absolute mode)."""
        if self.positions != "cache" or not self.num_sinks or self.max_past is None:
            return jnp.zeros_like(q_pos)
        return jnp.maximum(0, q_pos - self.num_sinks - self.max_past)


# ------------------------------------------------------------------------------ policies
class KVPolicy:
    """Base class: a policy says which cache group each KV head belongs to."""

    positions: str

    def groups(self, num_kv_heads: int) -> tuple[CacheGroup, ...]:
        return (self._group(tuple(range(num_kv_heads))),)

    def _group(self, kv_heads) -> CacheGroup:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class FullCache(KVPolicy):
    """Keep the newest `max_cache` past frames (exact full attention up to max_cache + 1)."""

    max_cache: int
    positions: str = "absolute"

    def __post_init__(self):
        _check_int("max_cache", self.max_cache, 1)
        _check_positions(self.positions)

    def _group(self, kv_heads):
        return CacheGroup(kv_heads, int(self.max_cache), 0, self.positions)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(KVPolicy):
    """Keep the newest `window` past frames."""

    window: int
    positions: str = "absolute"

    def __post_init__(self):
        _check_int("window", self.window, 0)
        _check_positions(self.positions)

    def _group(self, kv_heads):
        return CacheGroup(kv_heads, int(self.window), 0, self.positions)


@dataclasses.dataclass(frozen=True)
class SinksWindow(KVPolicy):
    """StreamingLLM: the first `num_sinks` frames forever plus the newest `window` past frames,
    by default at cache positions (see the module docstring)."""

    num_sinks: int
    window: int
    positions: str = "cache"

    def __post_init__(self):
        _check_int("num_sinks", self.num_sinks, 0)
        _check_int("window", self.window, 0)
        _check_positions(self.positions)

    def _group(self, kv_heads):
        return CacheGroup(kv_heads, int(self.window), int(self.num_sinks), self.positions)


@dataclasses.dataclass(frozen=True)
class PerHead(KVPolicy):
    """One policy per KV head (`head_policies[i]` for KV head i); equal policies share a group.

    Under GQA a KV head's policy applies to all the query heads that read it.
    """

    head_policies: tuple

    def __post_init__(self):
        policies = tuple(self.head_policies)
        object.__setattr__(self, "head_policies", policies)
        if not policies:
            raise ValueError("head_policies: expected one policy per KV head, got none")
        for i, p in enumerate(policies):
            if not isinstance(p, (FullCache, SlidingWindow, SinksWindow)):
                raise ValueError(
                    f"head_policies[{i}]: expected a FullCache, SlidingWindow or SinksWindow, "
                    f"got {type(p).__name__}")

    @property
    def positions(self):
        modes = {p.positions for p in self.head_policies}
        return modes.pop() if len(modes) == 1 else "mixed"

    def groups(self, num_kv_heads):
        if len(self.head_policies) != num_kv_heads:
            raise ValueError(
                f"policy: expected one policy per KV head (num_kv_heads={num_kv_heads}), got "
                f"{len(self.head_policies)}")
        order = []
        for p in self.head_policies:
            if p not in order:
                order.append(p)
        return tuple(p._group(tuple(i for i, q in enumerate(self.head_policies) if q == p))
                     for p in order)


def duo_attention(retrieval: Sequence[bool], *, max_cache: int, num_sinks: int, window: int,
                  positions: str = "cache") -> PerHead:
    """DuoAttention: KV head i keeps a full cache (`FullCache(max_cache)`) where
    `retrieval[i]`, else sinks + window (`SinksWindow(num_sinks, window)`)."""
    retrieval = [bool(r) for r in retrieval]
    full = FullCache(max_cache, positions=positions)
    streaming = SinksWindow(num_sinks, window, positions=positions)
    return PerHead(tuple(full if r else streaming for r in retrieval))


def legacy_group(num_kv_heads, max_past, num_sinks) -> CacheGroup:
    """The single absolute-position group of `StreamingAttention(max_past=..., num_sinks=...)`."""
    return CacheGroup(tuple(range(num_kv_heads)), max_past, num_sinks, "absolute")


# ------------------------------------------------------------------- cache mechanics
# One group's per-row cache: slots [0, s) hold the sinks (slot j = position j), slots s + r
# form the ring (position p lives in ring slot p % R); `slot_pos` tags each slot with the
# position it holds (-1 = empty). All functions are per group and work for any chunk length
# T >= 0, also longer than the ring.

def take_rows(values, idx):
    """Per row b: `values[b, idx[b]]` along axis 1."""
    idx = idx.reshape(idx.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, idx, axis=1)


def assemble_keys(cache_k, cache_v, slot_pos, k, v, chunk_pos, count, start, num_sinks):
    """The keys a chunk attends to, sinks first: `[sink set (s), ring (R), chunk (T)]`.

    The sink set takes sink j from its slot once written, else from the chunk (the chunk may
    hold the first frames); ring and chunk keys at positions < s are then marked invalid, so
    each frame appears once. Returns keys, values, key positions and key validity.
    """
    s = num_sinks
    ring, length = cache_k.shape[1] - s, k.shape[1]
    frames = jnp.arange(length, dtype=jnp.int32)
    chunk_valid = frames[None] < count[:, None]
    j = jnp.arange(s, dtype=jnp.int32)[None]
    src = jnp.where(j < start[:, None], j, s + ring + j - start[:, None])
    src = jnp.clip(src, 0, s + ring + length - 1)
    sink_k = take_rows(jnp.concatenate([cache_k, k], axis=1), src)
    sink_v = take_rows(jnp.concatenate([cache_v, v], axis=1), src)
    keys = jnp.concatenate([sink_k, cache_k[:, s:], k], axis=1)
    vals = jnp.concatenate([sink_v, cache_v[:, s:], v], axis=1)
    key_pos = jnp.concatenate([jnp.broadcast_to(j, src.shape), slot_pos[:, s:], chunk_pos], axis=1)
    key_valid = jnp.concatenate([j < (start + count)[:, None], slot_pos[:, s:] >= s,
                                 chunk_valid & (chunk_pos >= s)], axis=1)
    return keys, vals, key_pos, key_valid


def write_cache(cache_k, cache_v, slot_pos, k, v, chunk_pos, start, end, num_sinks):
    """The cache after committing the chunk's frames `start .. end-1` (per row).

    A gather, not a scatter: each slot pulls the newest committed frame it is meant to hold
    from (cache ++ chunk). Uncommitted frames lie past `end` and are never pulled, and a chunk
    longer than the ring leaves only its last R frames.
    """
    s = num_sinks
    ring = cache_k.shape[1] - s
    slots = jnp.arange(s + ring, dtype=jnp.int32)
    end1 = end[:, None] - 1
    newest = end1 - jnp.mod(end1 - (slots - s), ring)            # ring slot r: p % R == r
    target = jnp.where(slots < s, slots, newest)                   # sink slot j: position j
    from_chunk = (target >= start[:, None]) & (target < end[:, None])
    src = jnp.where(from_chunk, s + ring + target - start[:, None], slots)
    all_pos = jnp.concatenate([slot_pos, chunk_pos], axis=1)
    return (take_rows(jnp.concatenate([cache_k, k], axis=1), src),
            take_rows(jnp.concatenate([cache_v, v], axis=1), src),
            jnp.take_along_axis(all_pos, src, axis=1))


def rollback_cache(slot_pos, new_pos):
    """Forget the slots holding positions >= `new_pos [B]` (their frames are uncommitted)."""
    return jnp.where(slot_pos >= new_pos[:, None], -1, slot_pos)


__all__ = ["CacheGroup", "FullCache", "KVPolicy", "POSITION_MODES", "PerHead", "SinksWindow",
           "SlidingWindow", "assemble_keys", "duo_attention", "rollback_cache", "take_rows",
           "write_cache"]
