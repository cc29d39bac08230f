"""The streaming attention mask, and the block schedules kernels derive from it.

The rule (that of `streamzoo.layers.attention.attention_mask`, plus chunks): a query at
position `p` sees a key at position `k` when

* `k <= p + max_future` (`max_future=None`: no bound from this rule; 0 is causal),
* `k // chunk_size <= p // chunk_size` (block-causal: a query sees its whole chunk),
* and either `k < num_sinks` (the first frames of the stream, kept forever) or both
  `k >= p - max_past` (`None`: unbounded) and `k // chunk_size >= p // chunk_size - left_chunks`
  (`None`: all earlier chunks).

For one query that is an interval of key positions `[lo(p), hi(p)]` plus the sinks
`k < num_sinks` (those only when `k <= hi(p)`). Kernels never evaluate the rule itself: a
cheap jnp pre-pass turns it into per-query *row bounds* in key-index space, `lo_i`, `hi_i`
and a per-row `sink_end` (key indices below it are sinks), so that key j is visible to query
i exactly when

    j <= hi_i  and  (j >= lo_i  or  j < sink_end)                     (`visible_from_bounds`)

(an invalid query gets `hi_i = -1`: sees nothing; key lengths are folded into `hi_i`). From
the row bounds the pre-pass builds, per (row, query block), the ascending list of key blocks
that hold at least one visible pair (`block_schedule`): kernels iterate over that list only,
so tiles the mask empties are never loaded or computed. The list's static length for a TPU
grid comes from `MaskSpec.max_key_blocks`.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

# Stand-in for an unbounded side of the interval; positions stay far below it.
UNBOUNDED = 1 << 30


def _check_int(name, value, minimum, allow_none):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}: expected {kind}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static mask parameters (see the module docstring)."""

    max_past: int | None = None
    max_future: int | None = 0
    num_sinks: int = 0
    chunk_size: int | None = None
    left_chunks: int | None = None

    def __post_init__(self):
        _check_int("max_past", self.max_past, 0, True)
        _check_int("max_future", self.max_future, 0, True)
        _check_int("num_sinks", self.num_sinks, 0, False)
        _check_int("chunk_size", self.chunk_size, 1, True)
        _check_int("left_chunks", self.left_chunks, 0, True)
        if self.left_chunks is not None and self.chunk_size is None:
            raise ValueError(f"left_chunks: needs chunk_size, got left_chunks={self.left_chunks} "
                             "and chunk_size=None")

    @property
    def past_bounded(self) -> bool:
        return self.max_past is not None or self.left_chunks is not None

    def visible(self, q_pos, k_pos):
        """Elementwise (broadcasting) bool: the rule on positions, validity not included."""
        ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
        past = ok
        if self.max_future is not None:
            ok = ok & (k_pos <= q_pos + self.max_future)
        if self.max_past is not None:
            past = past & (k_pos >= q_pos - self.max_past)
        if self.chunk_size is not None:
            cq, ck = q_pos // self.chunk_size, k_pos // self.chunk_size
            ok = ok & (ck <= cq)
            if self.left_chunks is not None:
                past = past & (ck >= cq - self.left_chunks)
        if self.past_bounded and self.num_sinks:
            past = past | (k_pos < self.num_sinks)
        return ok & past

    def position_bounds(self, q_pos):
        """`(lo, hi)` int32 like q_pos: the key positions `lo <= k <= hi` a query sees (sinks
        aside); `-UNBOUNDED` / `UNBOUNDED` where a side has no bound."""
        q_pos = jnp.asarray(q_pos, jnp.int32)
        lo = jnp.full_like(q_pos, -UNBOUNDED)
        hi = jnp.full_like(q_pos, UNBOUNDED)
        if self.max_future is not None:
            hi = jnp.minimum(hi, q_pos + self.max_future)
        if self.max_past is not None:
            lo = jnp.maximum(lo, q_pos - self.max_past)
        if self.chunk_size is not None:
            c = self.chunk_size
            chunk = jnp.floor_divide(q_pos, c)
            hi = jnp.minimum(hi, (chunk + 1) * c - 1)
            if self.left_chunks is not None:
                lo = jnp.maximum(lo, (chunk - self.left_chunks) * c)
        return lo, hi

    def key_span(self, num_queries: int) -> int | None:
        """Static bound on `hi(p_last) - lo(p_first) + 1` over `num_queries` consecutive
        query positions (None when the past or the future is unbounded)."""
        future = [f for f in (self.max_future,
                              None if self.chunk_size is None else self.chunk_size - 1)
                  if f is not None]
        past = [p for p in (self.max_past, None if self.left_chunks is None else
                            (self.chunk_size - 1) + self.left_chunks * self.chunk_size)
                if p is not None]
        if not future or not past:
            return None
        return num_queries + min(future) + min(past)

    def max_key_blocks(self, block_q: int, block_k: int, num_k_blocks: int) -> int:
        """Static bound on the key blocks one block of `block_q` consecutive queries visits
        (window blocks at any alignment plus the sink blocks), at most `num_k_blocks`."""
        span = self.key_span(block_q)
        if span is None:
            return num_k_blocks
        window = (span + block_k - 2) // block_k + 1
        sinks = -(-self.num_sinks // block_k) if self.past_bounded else 0
        return max(1, min(num_k_blocks, window + sinks))


# --------------------------------------------------------------------------- row bounds
def row_bounds(spec: MaskSpec, q_pos, q_valid, k_offsets, k_lengths):
    """Per-query bounds in key-index space for keys at contiguous positions.

    q_pos `[B, Tq]` int, q_valid `[B, Tq]` bool, key j of row b at position
    `k_offsets[b] + j`, valid for `j < k_lengths[b]`. Returns `lo, hi [B, Tq]` and
    `sink_end [B]` (int32) with the meaning of the module docstring.
    """
    lo, hi = spec.position_bounds(q_pos)
    k_offsets = jnp.asarray(k_offsets, jnp.int32)[:, None]
    k_lengths = jnp.asarray(k_lengths, jnp.int32)[:, None]
    lo = jnp.maximum(lo - k_offsets, 0)                  # no int32 overflow: |bounds| <= 2^30
    hi = jnp.minimum(hi - k_offsets, k_lengths - 1)
    hi = jnp.where(q_valid, hi, -1)
    sink_end = jnp.clip(spec.num_sinks - k_offsets[:, 0], 0, k_lengths[:, 0])
    return lo.astype(jnp.int32), hi.astype(jnp.int32), sink_end.astype(jnp.int32)


def visible_from_bounds(j, lo, hi, sink_end):
    """Key index j visible to a query with bounds (lo, hi) (broadcasting)."""
    return (j <= hi) & ((j >= lo) | (j < sink_end))


def slot_row_bounds(spec: MaskSpec, q_pos, q_valid):
    """Per-query bounds in *position* space for keys at arbitrary positions (ring caches):
    a slot holding position s >= 0 is visible when `s <= hi and (s >= lo or s < num_sinks)`.
    Invalid queries get hi = -1."""
    lo, hi = spec.position_bounds(q_pos)
    hi = jnp.where(q_valid, hi, -1)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


# ------------------------------------------------------------------------ block schedules
def compact_blocks(live, max_blocks: int):
    """Ascending indices of the True entries of `live [..., N]`, padded to `max_blocks` by
    repeating the last one (a TPU grid then re-uses the block it has, fetching nothing), and
    their count `[...]`. `max_blocks` must bound the count (else entries are dropped)."""
    n = live.shape[-1]
    order = jnp.argsort(jnp.logical_not(live), axis=-1, stable=True).astype(jnp.int32)
    count = live.sum(-1).astype(jnp.int32)
    steps = jnp.arange(max_blocks, dtype=jnp.int32)
    order = order[..., :max_blocks] if max_blocks <= n else jnp.concatenate(
        [order, jnp.zeros(order.shape[:-1] + (max_blocks - n,), jnp.int32)], -1)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    return jnp.where(steps < count[..., None], order, last), count


def live_blocks(lo, hi, sink_end, block_q: int, block_k: int, num_k_blocks: int):
    """`[B, nq, nk]` bool: query block qb and key block kb hold a visible pair. Exact per
    query row (not a block-level over-approximation). lo/hi `[B, nq * block_q]`."""
    batch = lo.shape[0]
    lo = lo.reshape(batch, -1, block_q, 1)
    hi = hi.reshape(batch, -1, block_q, 1)
    first = jnp.arange(num_k_blocks, dtype=jnp.int32) * block_k
    top = jnp.minimum(first + block_k - 1, hi)           # the last key of the block a row sees
    rows = (top >= first) & ((top >= lo) | (sink_end[:, None, None, None] > first))
    return rows.any(axis=2)


def block_schedule(lo, hi, sink_end, block_q: int, block_k: int, num_k_blocks: int,
                   max_blocks: int):
    """Per (row, query block): the key blocks to visit, ascending (`[B, nq, max_blocks]`
    int32), how many (`[B, nq]`) and how many of them come first and hold sink keys
    (`[B, nq]`; those need the sink queries when the caller scores sinks separately)."""
    live = live_blocks(lo, hi, sink_end, block_q, block_k, num_k_blocks)
    blocks, count = compact_blocks(live, max_blocks)
    first = jnp.arange(num_k_blocks, dtype=jnp.int32) * block_k
    sink_blocks = (live & (first < sink_end[:, None, None])).sum(-1).astype(jnp.int32)
    return blocks, count, sink_blocks


def full_blocks(lo, hi, blocks, rows: int, block_k: int):
    """`[B, nq, nq_rows // rows, max_blocks]` bool: for each group of `rows` consecutive
    queries of a query block, whether every (query, key) pair of the scheduled key block
    `blocks [B, nq, max_blocks]` is visible (the kernel may then skip the elementwise mask).
    lo/hi `[B, nq * block_q]`."""
    batch, nq, _ = blocks.shape
    first = blocks[:, :, None, :] * block_k
    lo = lo.reshape(batch, nq, -1, rows).max(-1)[..., None]
    hi = hi.reshape(batch, nq, -1, rows).min(-1)[..., None]
    return (lo <= first) & (hi >= first + block_k - 1)


# ------------------------------------------------------------------------ softmax pieces
def online_softmax_step(s, visible, m, l, acc, v, scale, precision=None):
    """One key block of online softmax in float32: scores `s [M, N]` (unscaled), `visible`
    bool like s, running max `m [M, 1]`, denominator `l [M, 1]`, accumulator `acc [M, D]`,
    values `v [N, D]` (invisible rows of v must be finite), `precision` of the PV matmul.
    Never NaN when a row sees nothing."""
    s = jnp.where(visible, s * scale, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + p.sum(axis=-1, keepdims=True)
    acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, precision=precision,
                                preferred_element_type=jnp.float32)
    return m_new, l, acc


def matmul_precision(dtype):
    """float32 matmuls at full precision (Triton would otherwise use TF32), others default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def finish_softmax(m, l, acc):
    """`(out, lse)`: normalised output (zero where a row saw nothing) and log-sum-exp
    (-inf there)."""
    safe = jnp.where(l > 0, l, 1.0)
    return acc / safe, jnp.where(l > 0, m + jnp.log(safe), -jnp.inf)


__all__ = ["MaskSpec", "UNBOUNDED", "block_schedule", "compact_blocks",
           "finish_softmax", "full_blocks", "live_blocks", "matmul_precision", "online_softmax_step", "row_bounds",
           "slot_row_bounds", "visible_from_bounds"]
