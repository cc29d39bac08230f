"""A paged KV cache (the PagedAttention layout) for the LM decode loop.

This is a decode-time structure, not a `StreamLayer`: it replaces the model's per-row ring
caches when `streamzoo.zoo.lm.decode` is given a `PagedCache` as the carry. Every layer's keys
and values live in one pool of fixed-size pages shared by all rows; row b's logical page i
(tokens `i*P .. i*P + P-1`) is the physical page `page_table[b, i]`. Rows therefore take
memory in proportion to their own length, not to the longest row, and rows can share pages:

* `reserve(cache, counts)` allocates the pages that `counts[b]` more tokens need (free pages
  are those with `ref_count == 0`), and copies on write: a row about to write into a partially
  filled page that another row also holds first gets its own copy of that page.
* `free_rows(cache, rows)` drops the rows' references (pages with no reference are free).
* `share_prefix(cache, src, dst, num_tokens)` makes row `dst` hold row `src`'s first
  `num_tokens` tokens by reference (prefix sharing: one prompt, several continuations).

Attention over the pages is full causal attention with absolute positions over every token of
the row (the `FullCache` semantics) with capacity `pages_per_row * page_size`; the model's own
cache policy is not used (parameters do not depend on it). Reads gather the row's pages into
a contiguous `[B, capacity, Hkv, Dh]` view (the jnp reference; a Pallas paged-attention kernel
would read the pages in place). Running out of pages or of page-table entries cannot raise
inside `jit`: it sets the sticky `overflow` flag, the writes that do not fit are dropped, and
the decode drivers raise a `RuntimeError` on the host when they see it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from streamzoo.core.seq import Seq
from streamzoo.layers.attention import attention_reference


@struct.dataclass
class PagedCache:
    """Page pool, page tables, reference counts and row lengths (all fixed shapes)."""

    k: jax.Array           # [L, num_pages, page_size, Hkv, Dh] keys rotated at their position
    v: jax.Array           # [L, num_pages, page_size, Hkv, Dh]
    page_table: jax.Array  # [B, pages_per_row] int32 physical page, -1 = none
    ref_count: jax.Array   # [num_pages] int32 rows holding the page, 0 = free
    lengths: jax.Array     # [B] int32 committed tokens per row
    overflow: jax.Array    # [] bool: some write did not fit (sticky)

    @property
    def batch_size(self) -> int:
        return self.page_table.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def capacity(self) -> int:
        """Tokens one row can hold: pages_per_row * page_size."""
        return self.page_table.shape[1] * self.page_size


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def create(model, batch_size: int, *, num_pages: int, page_size: int, pages_per_row: int,
           dtype=None) -> PagedCache:
    """An empty paged cache for `model` (a `StreamingLM`); `dtype`: the KV dtype."""
    _check_int("batch_size", batch_size, 1)
    _check_int("num_pages", num_pages, 1)
    _check_int("page_size", page_size, 1)
    _check_int("pages_per_row", pages_per_row, 1)
    attn = model.attention
    dtype = dtype or model.dtype or jnp.float32
    shape = (model.num_layers, num_pages, page_size, attn.num_kv_heads, attn.head_dim)
    return PagedCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                      jnp.full((batch_size, pages_per_row), -1, jnp.int32),
                      jnp.zeros((num_pages,), jnp.int32), jnp.zeros((batch_size,), jnp.int32),
                      jnp.zeros((), bool))


def _ceil_div(a, b):
    return (a + b - 1) // b


def _add_refs(ref_count, pages, delta):
    """`ref_count[p] += delta` for every page id in `pages` (-1 entries ignored)."""
    pages = jnp.where(pages >= 0, pages, ref_count.shape[0]).ravel()
    return ref_count.at[pages].add(delta, mode="drop")


def reserve(cache: PagedCache, counts) -> PagedCache:
    """Pages for `counts [B]` more tokens per row, copying a shared partial last page first."""
    size, per_row = cache.page_size, cache.page_table.shape[1]
    table, ref = cache.page_table, cache.ref_count
    have = _ceil_div(cache.lengths, size)                     # pages in use
    want = _ceil_div(cache.lengths + counts, size)            # pages needed after the write
    last = jnp.take_along_axis(table, jnp.clip(have - 1, 0, per_row - 1)[:, None], axis=1)[:, 0]
    partial = (counts > 0) & (cache.lengths % size != 0) & (last >= 0)
    cow = partial & (ref[jnp.maximum(last, 0)] > 1)          # shared page about to be written
    need = jnp.maximum(jnp.minimum(want, per_row) - have, 0) + cow.astype(jnp.int32)

    free_ids = jnp.argsort(ref != 0, stable=True).astype(jnp.int32)  # free pages first
    num_free = jnp.sum(ref == 0)
    first = jnp.cumsum(need) - need                            # each row's first free-list slot

    logical = jnp.arange(per_row, dtype=jnp.int32)[None]
    cow_i = cow.astype(jnp.int32)[:, None]
    request = jnp.where(cow[:, None] & (logical == have[:, None] - 1), 0,
                        cow_i + logical - have[:, None])       # request index within the row
    assign = (cow[:, None] & (logical == have[:, None] - 1)) | (
        (logical >= have[:, None]) & (logical < want[:, None]))
    slot = first[:, None] + request
    fits = assign & (slot < num_free)
    new_pages = jnp.take(free_ids, jnp.clip(slot, 0, ref.shape[0] - 1))
    new_table = jnp.where(fits, new_pages, table)

    # Copy on write: the row's copy of its shared last page gets the page's contents.
    cow_done = cow & jnp.take_along_axis(fits, jnp.clip(have - 1, 0, per_row - 1)[:, None], 1)[:, 0]
    dst = jnp.take_along_axis(new_table, jnp.clip(have - 1, 0, per_row - 1)[:, None], 1)[:, 0]
    dst = jnp.where(cow_done, dst, cache.num_pages)            # out of range: dropped
    src = jnp.maximum(last, 0)
    k = cache.k.at[:, dst].set(cache.k[:, src], mode="drop")
    v = cache.v.at[:, dst].set(cache.v[:, src], mode="drop")

    ref = _add_refs(ref, jnp.where(fits, new_pages, -1), 1)
    ref = _add_refs(ref, jnp.where(cow_done, last, -1), -1)
    overflow = cache.overflow | jnp.any(assign & ~fits) | jnp.any(want > per_row)
    return cache.replace(k=k, v=v, page_table=new_table, ref_count=ref, overflow=overflow)


def free_rows(cache: PagedCache, rows) -> PagedCache:
    """Release the pages of the rows where `rows [B]` is True; they become empty rows."""
    rows = jnp.asarray(rows)
    if rows.shape != (cache.batch_size,) or rows.dtype != jnp.bool_:
        raise ValueError(f"rows: expected a bool array of shape ({cache.batch_size},), got "
                         f"{rows.dtype}{list(rows.shape)}")
    ref = _add_refs(cache.ref_count, jnp.where(rows[:, None], cache.page_table, -1), -1)
    return cache.replace(page_table=jnp.where(rows[:, None], -1, cache.page_table),
                         ref_count=ref, lengths=jnp.where(rows, 0, cache.lengths))


def share_prefix(cache: PagedCache, src, dst, num_tokens) -> PagedCache:
    """Row `dst` (its pages released first) holds row `src`'s first `num_tokens` tokens by
    reference; a later write into a shared page copies it first (`reserve`)."""
    batch = cache.batch_size
    dst_rows = jnp.arange(batch) == dst
    cache = free_rows(cache, dst_rows)
    num_tokens = jnp.minimum(jnp.asarray(num_tokens, jnp.int32), cache.lengths[src])
    pages = jnp.where(jnp.arange(cache.page_table.shape[1]) < _ceil_div(num_tokens, cache.page_size),
                      cache.page_table[src], -1)
    return cache.replace(page_table=jnp.where(dst_rows[:, None], pages[None], cache.page_table),
                         ref_count=_add_refs(cache.ref_count, pages, 1),
                         lengths=jnp.where(dst_rows, num_tokens, cache.lengths))


def gather_rows(pool: jax.Array, page_table: jax.Array) -> jax.Array:
    """One layer's pool `[num_pages, P, Hkv, Dh]` -> rows `[B, pages_per_row * P, Hkv, Dh]`
    (unassigned pages read page 0: mask them by length)."""
    rows = pool[jnp.maximum(page_table, 0)]                      # [B, M, P, Hkv, Dh]
    return rows.reshape(rows.shape[0], -1, *rows.shape[3:])


def step_hidden(model, cache: PagedCache, x: Seq):
    """`model.step_hidden` with the KV cache in pages: `(cache, final hidden Seq)`."""
    model.check_input(x, "x")
    if x.batch_size != cache.batch_size:
        raise ValueError(f"x: expected batch size {cache.batch_size} (the cache's), got "
                         f"{x.batch_size}")
    x = x.compacted()
    count = x.lengths()
    cache = reserve(cache, count)
    size, (batch, per_row) = cache.page_size, cache.page_table.shape
    frames = jnp.arange(x.length, dtype=jnp.int32)[None]
    positions = cache.lengths[:, None] + frames
    page = positions // size
    phys = jnp.take_along_axis(cache.page_table, jnp.clip(page, 0, per_row - 1), axis=1)
    writable = (frames < count[:, None]) & (page < per_row) & (phys >= 0)
    phys = jnp.where(writable, phys, cache.num_pages)          # out of range: dropped
    offset = positions % size
    end = jnp.minimum(cache.lengths + count, cache.capacity)
    key_pos = jnp.broadcast_to(jnp.arange(cache.capacity, dtype=jnp.int32), (batch, cache.capacity))
    key_valid = key_pos < end[:, None]
    dtype = model.dtype or jnp.float32

    def layer(h, block_and_pools):
        block, k_pool, v_pool = block_and_pools

        def attend(xn):
            attn = block.attn
            q, k, v = attn._project(xn.values.astype(dtype), positions)
            k_pool2 = k_pool.at[phys, offset].set(k.astype(k_pool.dtype), mode="drop")
            v_pool2 = v_pool.at[phys, offset].set(v.astype(v_pool.dtype), mode="drop")
            keys = gather_rows(k_pool2, cache.page_table).astype(dtype)
            vals = gather_rows(v_pool2, cache.page_table).astype(dtype)
            o = attention_reference(q, keys, vals, positions, key_pos, key_valid, None, 0, 0)
            return attn._output(o, xn.mask), (k_pool2, v_pool2)

        h, pools = block.with_attention(h, attend)
        return h, pools

    h = Seq(model._embed(x.values), x.mask, compact=True).masked()
    h, (k, v) = jax.lax.scan(layer, h, (model.blocks.layers, cache.k, cache.v))
    cache = cache.replace(k=k, v=v, lengths=cache.lengths + count)
    return cache, model.final_norm(h)


def step(model, cache: PagedCache, x: Seq):
    """`model.step` with the KV cache in pages: `(cache, logits Seq)`."""
    cache, h = step_hidden(model, cache, x)
    return cache, model._logits(h)


def check_overflow(cache: PagedCache) -> None:
    """Raise a RuntimeError (on the host) if a write did not fit the pool or a page table."""
    if bool(cache.overflow):
        raise RuntimeError(
            f"paged cache overflow: a row needed more than pages_per_row="
            f"{cache.page_table.shape[1]} pages ({cache.capacity} tokens) or the pool of "
            f"{cache.num_pages} pages ran out; writes were dropped (make the cache larger)")


__all__ = ["PagedCache", "check_overflow", "create", "free_rows", "gather_rows", "reserve",
           "share_prefix", "step", "step_hidden"]
