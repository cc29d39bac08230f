"""Masked attention for prefill and training: causal, window (`max_past`, `max_future`),
sinks, chunk/block-causal, per-row lengths, GQA; forward as Pallas kernels, gradients through
`jax.custom_vjp`.

`attention(q, k, v, ...)` computes, per row b, query i (position `q_positions[b, i]`, by
default `q_offsets[b] + i`) over keys j at contiguous positions `k_offsets[b] + j`, with the
mask of `streamzoo.pallas_kernels.masks` (the rule of `StreamingAttention`). Keys at
arbitrary positions (ring caches) are `ring_decode_attention`'s job.

Tiles the mask empties are skipped, not computed: a jnp pre-pass (`masks.block_schedule`)
lists, per query block, the key blocks that hold a visible pair, and every kernel iterates
over that list only (a window of W keys costs O(T·W), not O(T²)). Implementations (`impl=`,
see `dispatch.resolve_impl`):

* "xla": `attention_reference`, dense jnp (the CPU path and the oracle);
* "mosaic_gpu": Hopper kernel (TMA + WGMMA, two compute warpgroups sharing one
  pipelined K/V stream fed by a producer warpgroup); bf16/f16, head_dim % 64 == 0;
* "triton": the portable kernel below compiled by Pallas' Triton backend (GPU fallback for
  what Mosaic GPU does not take: float32, head_dim not a multiple of 64);
* "tpu": Mosaic TPU kernel (grid over the scheduled key blocks, scalar-prefetched schedule,
  VMEM accumulators); "tpu_interpret" runs it in the TPU simulator;
* "interpret": the portable kernel in Pallas' interpreter (how CI checks it on the CPU).

Gradients: every Pallas implementation shares one `custom_vjp` whose backward is the
*reference* backward (the vjp of the dense jnp reference, recomputed), so training is exact
but not yet memory-efficient; a Pallas backward is future work.

Scores and softmax are float32; matmul inputs stay in the input dtype (float32 accumulation).
A query that sees no key, and every invalid query, outputs zeros (never NaN, also when the
unused key/value frames hold NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from streamzoo.pallas_kernels import masks
from streamzoo.pallas_kernels.dispatch import resolve_impl
from streamzoo.pallas_kernels.masks import MaskSpec

KERNEL = "attention"
_LOG2E = math.log2(math.e)
_META = 4   # per (row, query block): count, sink-phase count, sink_end, k_length, then blocks


# ------------------------------------------------------------------------------ reference
def _reference(spec: MaskSpec, scale, q, k, v, q_sinks, q_pos, q_valid, k_offsets,
               k_lengths):
    """Dense masked attention in float32 on positions (no row bounds, no blocks)."""
    batch, tq, heads, dim = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    groups, dtype = heads // kv_heads, q.dtype
    k_pos = k_offsets[:, None] + jnp.arange(tk, dtype=jnp.int32)
    k_valid = jnp.arange(tk)[None] < k_lengths[:, None]
    f32 = jnp.float32
    # Invalid frames may hold anything (NaN): zero them, so no NaN reaches outputs or grads.
    clean = lambda x, ok: jnp.where(ok[:, :, None, None], x.astype(f32), 0.0)
    q, kf, v = clean(q, q_valid), clean(k, k_valid), clean(v, k_valid)
    qg = q.reshape(batch, tq, kv_heads, groups, dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, kf) * scale
    if q_sinks is not None:
        qs = clean(q_sinks, q_valid).reshape(batch, tq, kv_heads, groups, dim)
        sink_scores = jnp.einsum("bqhgd,bkhd->bhgqk", qs, kf) * scale
        is_sink = (k_pos < spec.num_sinks)[:, None, None, None, :]
        scores = jnp.where(is_sink, sink_scores, scores)
    mask = spec.visible(q_pos[:, :, None], k_pos[:, None, :])
    mask &= k_valid[:, None, :] & q_valid[:, :, None]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    top = lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v)
    return out.reshape(batch, tq, heads, dim).astype(dtype)


def attention_reference(q, k, v, *, q_positions=None, q_offsets=None, k_offsets=None,
                        lengths=None, k_lengths=None, max_past=None, max_future=0,
                        num_sinks=0, chunk_size=None, left_chunks=None, q_sinks=None,
                        scale=None):
    """`attention` in dense jnp (same arguments, no `impl`)."""
    spec, scale, ints = _prepare(q, k, v, q_positions, q_offsets, k_offsets, lengths,
                                 k_lengths, max_past, max_future, num_sinks, chunk_size,
                                 left_chunks, q_sinks, scale)
    return _reference(spec, scale, q, k, v, q_sinks, *ints)


# ------------------------------------------------------------------------------ the API
def attention(q, k, v, *, q_positions=None, q_offsets=None, k_offsets=None, lengths=None,
              k_lengths=None, max_past=None, max_future=0, num_sinks=0, chunk_size=None,
              left_chunks=None, q_sinks=None, scale=None, impl="auto", block_q=None,
              block_k=None):
    """Masked multi-/grouped-query attention (see the module docstring).

    q `[B, Tq, H, D]`; k, v `[B, Tk, Hkv, D]` (H a multiple of Hkv), one dtype.
    Positions: `q_positions [B, Tq]` int, or `q_offsets [B]` (query i at `q_offsets[b] + i`,
    default 0); key j at `k_offsets[b] + j` (default 0; offsets >= 0).
    `lengths [B]`: valid queries (and keys, unless `k_lengths [B]` is given); default all.
    Mask: `max_past` (None: unbounded), `max_future` (0: causal, None: bidirectional),
    `num_sinks`, `chunk_size` with `left_chunks` (block-causal; None: all earlier chunks).
    `q_sinks` (like q, optional): the queries scored against sink keys (positions <
    num_sinks), as StreamingLLM cache positions need. `scale` defaults to `D ** -0.5`.
    `impl`: "auto" | "xla" | "mosaic_gpu" | "triton" | "tpu" | "tpu_interpret" | "interpret".
    `block_q`, `block_k`: tile sizes (defaults per implementation).
    Returns `[B, Tq, H, D]` in q's dtype; invalid queries and queries that see nothing are 0.
    """
    spec, scale, ints = _prepare(q, k, v, q_positions, q_offsets, k_offsets, lengths,
                                 k_lengths, max_past, max_future, num_sinks, chunk_size,
                                 left_chunks, q_sinks, scale)
    impl = resolve_impl(impl, KERNEL, _supported(q))
    if impl == "xla":
        return _reference(spec, scale, q, k, v, q_sinks, *ints)
    block_q, block_k = _blocks(impl, q.shape[1], k.shape[1], q.shape[-1], block_q, block_k)
    cfg = _Config(impl, spec, float(scale), block_q, block_k, q_positions is None)
    return _attention(cfg, q, k, v, q_sinks, ints)


def _supported(q):
    """Pallas implementations that take this call (Mosaic GPU: 16-bit, head_dim % 64)."""
    mosaic_ok = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 64 == 0
    return (("mosaic_gpu",) if mosaic_ok else ()) + ("triton", "tpu", "interpret")


def _prepare(q, k, v, q_positions, q_offsets, k_offsets, lengths, k_lengths, max_past,
             max_future, num_sinks, chunk_size, left_chunks, q_sinks, scale):
    """Validate and normalise: `(MaskSpec, scale, (q_pos, q_valid, k_offsets, k_lengths))`."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: expected rank 4 [B, T, heads, head_dim], got shape "
                             f"{jnp.shape(x)}")
    batch, tq, heads, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {k.shape}, got {v.shape}")
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"k: expected [B={batch}, Tk, Hkv, D={dim}], got {k.shape}")
    if heads % k.shape[2]:
        raise ValueError(f"k: expected a number of KV heads dividing {heads}, got {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"k, v: expected q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if q_sinks is not None and (q_sinks.shape != q.shape or q_sinks.dtype != q.dtype):
        raise ValueError(f"q_sinks: expected {q.dtype}{list(q.shape)}, got "
                         f"{q_sinks.dtype}{list(q_sinks.shape)}")
    spec = MaskSpec(max_past, max_future, num_sinks, chunk_size, left_chunks)
    scale = dim ** -0.5 if scale is None else scale
    tk = k.shape[1]

    def per_row(name, x, default):
        if x is None:
            return jnp.full((batch,), default, jnp.int32)
        x = jnp.asarray(x)
        if x.shape != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name}: expected an int array of shape ({batch},), got "
                             f"{x.dtype}{list(x.shape)}")
        return x.astype(jnp.int32)

    if q_positions is not None:
        if q_offsets is not None:
            raise ValueError("q_offsets: pass q_positions or q_offsets, got both")
        q_pos = jnp.asarray(q_positions)
        if q_pos.shape != (batch, tq) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
            raise ValueError(f"q_positions: expected an int array of shape ({batch}, {tq}), "
                             f"got {q_pos.dtype}{list(q_pos.shape)}")
        q_pos = q_pos.astype(jnp.int32)
    else:
        q_pos = per_row("q_offsets", q_offsets, 0)[:, None] + jnp.arange(tq, dtype=jnp.int32)
    q_len = per_row("lengths", lengths, tq)
    k_len = per_row("k_lengths", k_lengths, tk) if k_lengths is not None else (
        jnp.minimum(q_len, tk) if lengths is not None else jnp.full((batch,), tk, jnp.int32))
    q_valid = jnp.arange(tq)[None] < q_len[:, None]
    return spec, scale, (q_pos, q_valid, per_row("k_offsets", k_offsets, 0), k_len)


# ------------------------------------------------------------------------ kernel plumbing
@dataclasses.dataclass(frozen=True)
class _Config:
    impl: str
    spec: MaskSpec
    scale: float
    block_q: int
    block_k: int
    contiguous: bool   # queries at consecutive positions: the static schedule bound holds


def _pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _round_up(n, m):
    return -(-n // m) * m


def _blocks(impl, tq, tk, dim, block_q, block_k):
    """Tile sizes: the caller's, else a default per implementation (powers of two for
    Triton; multiples of 8 and 128 for TPU; 64-row warpgroup tiles for Mosaic GPU)."""
    if impl == "mosaic_gpu":
        bq, bk = block_q or 64, block_k or (128 if dim <= 128 else 64)
        if bq != 64 or bk not in (64, 128):
            raise ValueError(f"block_q, block_k: Mosaic GPU takes block_q=64 and block_k in "
                             f"(64, 128), got {bq}, {bk}")
        return bq, bk
    if impl in ("tpu", "tpu_interpret"):
        bq = block_q or min(128, _round_up(tq, 8))
        bk = block_k or 128
        if bq % 8 or bk % 128:
            raise ValueError(f"block_q, block_k: TPU needs multiples of 8 and 128, got {bq}, "
                             f"{bk}")
        return bq, bk
    bq = block_q or max(16, min(64, _pow2(tq)))
    bk = block_k or max(16, min(64, _pow2(tk)))
    if impl == "triton" and (bq != _pow2(bq) or bk != _pow2(bk) or min(bq, bk) < 16):
        raise ValueError(f"block_q, block_k: Triton needs powers of two >= 16, got {bq}, {bk}")
    return bq, bk


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_sinks, ints):
    return _forward(cfg, q, k, v, q_sinks, ints)


def _attention_fwd(cfg, q, k, v, q_sinks, ints):
    return _forward(cfg, q, k, v, q_sinks, ints), (q, k, v, q_sinks, ints)


def _attention_bwd(cfg, res, g):
    """The reference backward: the vjp of the dense jnp reference, recomputed."""
    q, k, v, q_sinks, ints = res
    fn = lambda q, k, v, qs: _reference(cfg.spec, cfg.scale, q, k, v, qs, *ints)
    _, vjp = jax.vjp(fn, q, k, v, q_sinks)
    dq, dk, dv, dqs = vjp(g)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), ints)
    return dq, dk, dv, dqs, zeros


_attention.defvjp(_attention_fwd, _attention_bwd)


def _schedule(cfg, tq_pad, tk_pad, block_q, ints):
    """Row bounds (padded), schedule and meta for `block_q`-query blocks."""
    q_pos, q_valid, k_offsets, k_lengths = ints
    tq = q_pos.shape[1]
    lo, hi, sink_end = masks.row_bounds(cfg.spec, q_pos, q_valid, k_offsets, k_lengths)
    pad = ((0, 0), (0, tq_pad - tq))
    lo, hi = jnp.pad(lo, pad), jnp.pad(hi, pad, constant_values=-1)
    nk = tk_pad // cfg.block_k
    max_blocks = (cfg.spec.max_key_blocks(block_q, cfg.block_k, nk) if cfg.contiguous
                  else nk)
    blocks, count, sink_blocks = masks.block_schedule(lo, hi, sink_end, block_q, cfg.block_k,
                                                      nk, max_blocks)
    return lo, hi, sink_end, blocks, count, sink_blocks


def _meta(blocks, count, sink_blocks, sink_end, k_lengths, width, extra=None):
    """`[B, nq, width]` int32: count, sink-phase count, sink_end, k_length, block list, then
    `extra [B, nq, n]` if given."""
    batch, nq, _ = blocks.shape
    head = jnp.stack([count, sink_blocks, jnp.broadcast_to(sink_end[:, None], count.shape),
                      jnp.broadcast_to(k_lengths[:, None], count.shape)], axis=-1)
    parts = [head, blocks] + ([] if extra is None else [extra])
    used = sum(x.shape[-1] for x in parts)
    return jnp.concatenate(parts + [jnp.zeros((batch, nq, width - used), jnp.int32)], axis=-1)


def _forward(cfg, q, k, v, q_sinks, ints):
    batch, tq, heads, dim = q.shape
    tk = k.shape[1]
    cta_q = 2 * cfg.block_q if cfg.impl == "mosaic_gpu" else cfg.block_q
    tq_pad, tk_pad = _round_up(tq, cta_q), _round_up(tk, cfg.block_k)
    lo, hi, sink_end, blocks, count, sink_blocks = _schedule(cfg, tq_pad, tk_pad, cta_q, ints)
    if q_sinks is None:
        sink_blocks = jnp.zeros_like(sink_blocks)   # no separate sink scoring needed
    pad_t = lambda x, t: jnp.pad(x, ((0, 0), (0, t - x.shape[1]), (0, 0), (0, 0)))
    q, k, v = pad_t(q, tq_pad), pad_t(k, tk_pad), pad_t(v, tk_pad)
    if q_sinks is not None:
        q_sinks = pad_t(q_sinks, tq_pad)
    k_lengths = ints[3]
    if cfg.impl in ("tpu", "tpu_interpret"):
        out = _tpu_forward(cfg, q, k, v, q_sinks, lo, hi, sink_end, k_lengths, blocks, count,
                           sink_blocks)
    else:
        if cfg.impl == "mosaic_gpu":
            # Per warpgroup (64 rows) and scheduled block: is every pair visible? Then the
            # kernel skips the elementwise mask (all blocks but the mask's edges).
            batch, nq, max_blocks = blocks.shape
            full = masks.full_blocks(lo, hi, blocks, cfg.block_q, cfg.block_k)
            extra = full.astype(jnp.int32).reshape(batch, nq, 2 * max_blocks)
            width = _pow2(_META + 3 * max_blocks)
            meta = _meta(blocks, count, sink_blocks, sink_end, k_lengths, width, extra)
            out = _mosaic_gpu_forward(cfg, q, k, v, q_sinks, lo, hi, meta, max_blocks)
        else:
            width = _pow2(_META + blocks.shape[-1])
            meta = _meta(blocks, count, sink_blocks, sink_end, k_lengths, width)
            out = _portable_forward(cfg, q, k, v, q_sinks, lo, hi, meta)
    return out[:, :tq]


# ------------------------------------------------------------- portable kernel (interpret,
# Triton): one program per (row, head, query block), a loop over the scheduled key blocks.
def _portable_kernel(meta_ref, lo_ref, hi_ref, q_ref, *refs, block_k, scale, dual):
    if dual:
        qs_ref, k_ref, v_ref, o_ref = refs
    else:
        (k_ref, v_ref, o_ref), qs_ref = refs, None
    count, sink_blocks, sink_end, k_len = (meta_ref[i] for i in range(_META))
    q = q_ref[...]
    lo, hi = lo_ref[...][:, None], hi_ref[...][:, None]
    block_q, dim = q.shape
    prec = masks.matmul_precision(q.dtype)
    cols = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    rows = lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)

    def step(t, carry, with_sinks):
        m, l, acc = carry
        start = pl.multiple_of(meta_ref[_META + t] * block_k, block_k)
        kt, vt = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        s = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), precision=prec,
                            preferred_element_type=jnp.float32)
        j = start + cols
        if with_sinks:
            s_sink = lax.dot_general(qs_ref[...], kt, (((1,), (1,)), ((), ())),
                                     precision=prec,
                                     preferred_element_type=jnp.float32)
            s = jnp.where(j < sink_end, s_sink, s)
        vt = jnp.where(start + rows < k_len, vt, jnp.zeros_like(vt))   # NaN-safe padding
        visible = masks.visible_from_bounds(j, lo, hi, sink_end)
        return masks.online_softmax_step(s, visible, m, l, acc, vt, scale, prec)

    carry = (jnp.full((block_q, 1), -jnp.inf, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
             jnp.zeros((block_q, dim), jnp.float32))
    if dual:
        carry = lax.fori_loop(0, sink_blocks, functools.partial(step, with_sinks=True), carry)
    carry = lax.fori_loop(sink_blocks if dual else 0, count,
                          functools.partial(step, with_sinks=False), carry)
    out, _ = masks.finish_softmax(*carry)
    o_ref[...] = out.astype(o_ref.dtype)


def _portable_forward(cfg, q, k, v, q_sinks, lo, hi, meta):
    batch, tq_pad, heads, dim = q.shape
    tk_pad, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq = cfg.block_q
    dual = q_sinks is not None
    q_spec = pl.BlockSpec((None, bq, None, dim), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, tk_pad, None, dim), lambda b, h, i: (b, 0, lax.div(h, groups), 0))
    row_spec = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
    meta_spec = pl.BlockSpec((None, None, meta.shape[-1]), lambda b, h, i: (b, i, 0))
    in_specs = [meta_spec, row_spec, row_spec, q_spec] + [q_spec] * dual + [kv_spec, kv_spec]
    args = [meta, lo, hi, q] + [q_sinks] * dual + [k, v]
    kernel = functools.partial(_portable_kernel, block_k=cfg.block_k, scale=cfg.scale,
                               dual=dual)
    extra = {}
    if cfg.impl == "triton":
        from jax.experimental.pallas import triton as pltriton
        extra["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        kernel, grid=(batch, heads, tq_pad // bq), in_specs=in_specs, out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.impl == "interpret", name="streamzoo_attention", **extra)(*args)


# ----------------------------------------------------------------- TPU kernel (Mosaic TPU)
# Grid (row, head, query block, schedule step); the scheduled key block of each step comes
# from scalar-prefetched tables, so steps past a block's count re-use the block already in
# VMEM (no DMA) and skip all compute. Softmax state lives in VMEM scratch, lane-replicated.
_LANES = 128


def _tpu_kernel(sched_ref, count_ref, sink_blocks_ref, sink_end_ref, k_len_ref,
                lo_ref, hi_ref, q_ref, *refs, block_k, scale, dual, num_q_blocks,
                max_blocks):
    if dual:
        qs_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref = refs
    else:
        (k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref), qs_ref = refs, None
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * num_q_blocks + i
    count, sink_end, k_len = count_ref[row], sink_end_ref[b], k_len_ref[b]
    dim = acc_ref.shape[-1]
    prec = masks.matmul_precision(q_ref.dtype)

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def lanes(x, n):   # [M, 128] lane-replicated -> [M, n]
        return jnp.tile(x, (1, n // _LANES)) if n >= _LANES else x[:, :n]

    def update(with_sinks):
        start = sched_ref[row * max_blocks + t] * block_k
        q, kt, vt = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), precision=prec,
                            preferred_element_type=jnp.float32)
        shape = s.shape
        j = start + lax.broadcasted_iota(jnp.int32, shape, 1)
        if with_sinks:
            s_sink = lax.dot_general(qs_ref[...], kt, (((1,), (1,)), ((), ())),
                                     precision=prec,
                                     preferred_element_type=jnp.float32)
            s = jnp.where(j < sink_end, s_sink, s)
        lo, hi = lanes(lo_ref[...], block_k), lanes(hi_ref[...], block_k)
        s = jnp.where(masks.visible_from_bounds(j, lo, hi, sink_end), s * scale, -jnp.inf)
        rows = start + lax.broadcasted_iota(jnp.int32, vt.shape, 0)
        vt = jnp.where(rows < k_len, vt, jnp.zeros_like(vt))     # NaN-safe padding
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - lanes(m_safe, block_k))
        alpha = jnp.exp(m_prev - m_safe)
        l_ref[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
        m_ref[...] = m_next
        pv = jnp.dot(p.astype(vt.dtype), vt, precision=prec,
                     preferred_element_type=jnp.float32)
        acc_ref[...] = lanes(alpha, dim) * acc_ref[...] + pv

    if dual:
        sink_blocks = sink_blocks_ref[row]
        pl.when(t < sink_blocks)(lambda: update(True))
        pl.when((t >= sink_blocks) & (t < count))(lambda: update(False))
    else:
        pl.when(t < count)(lambda: update(False))

    @pl.when(t == max_blocks - 1)
    def _finish():
        l = l_ref[...]
        inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
        o_ref[...] = (acc_ref[...] * lanes(inv, dim)).astype(o_ref.dtype)


def _tpu_forward(cfg, q, k, v, q_sinks, lo, hi, sink_end, k_lengths, blocks, count,
                 sink_blocks):
    from jax.experimental.pallas import tpu as pltpu
    batch, tq_pad, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    bq, bk = cfg.block_q, cfg.block_k
    nq, max_blocks = blocks.shape[1], blocks.shape[2]
    dual = q_sinks is not None
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)              # [B, H, T, D]
    q, k, v = heads_major(q), heads_major(k), heads_major(v)
    lanes = lambda x: jnp.broadcast_to(x[..., None], x.shape + (_LANES,))
    scalars = (blocks.reshape(-1), count.reshape(-1), sink_blocks.reshape(-1), sink_end,
               k_lengths)

    def kv_map(b, h, i, t, sched, *_):
        return b, lax.div(h, groups), sched[(b * nq + i) * max_blocks + t], 0

    q_spec = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, t, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dim), kv_map)
    row_spec = pl.BlockSpec((None, bq, _LANES), lambda b, h, i, t, *_: (b, i, 0))
    in_specs = [row_spec, row_spec, q_spec] + [q_spec] * dual + [kv_spec, kv_spec]
    args = [lanes(lo), lanes(hi), q] + ([heads_major(q_sinks)] if dual else []) + [k, v]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars), grid=(batch, heads, nq, max_blocks),
        in_specs=in_specs, out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32),
                        pltpu.VMEM((bq, _LANES), jnp.float32),
                        pltpu.VMEM((bq, dim), jnp.float32)])
    kernel = functools.partial(_tpu_kernel, block_k=bk, scale=cfg.scale, dual=dual,
                               num_q_blocks=nq, max_blocks=max_blocks)
    out = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if cfg.impl == "tpu_interpret" else False,
        name="streamzoo_attention_tpu")(*scalars, *args)
    return heads_major(out)


# -------------------------------------------------------------------- Mosaic GPU kernel
# One CTA per (head, pair of 64-query blocks, row): warpgroups 0 and 1 compute one query
# block each, warpgroup 2 streams the scheduled K/V blocks through a ring of `_STAGES` SMEM
# slots with TMA. Both compute warpgroups walk the CTA's schedule (built for 128 queries)
# and mask per row, except on blocks the pre-pass marks fully visible for their 64 rows; a
# "ping-pong" barrier staggers them so one's softmax overlaps the other's WGMMA (the
# FlashAttention-3 schedule).
_STAGES = 2                   # at most; fewer when the tiles do not fit
_SMEM_BUDGET = 220 * 1024     # of the H100/H200's 227 KiB per block


def _mosaic_gpu_forward(cfg, q, k, v, q_sinks, lo, hi, meta, max_blocks):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    batch, tq_pad, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    bq, bk = cfg.block_q, cfg.block_k
    num_cta_q = tq_pad // (2 * bq)
    dual = q_sinks is not None
    dtype = q.dtype
    itemsize = jnp.dtype(dtype).itemsize
    fixed = 2 * (1 + dual) * bq * dim * itemsize + 4 * bq * 4 + 1024
    stages = min(_STAGES, (_SMEM_BUDGET - fixed) // (2 * bk * dim * itemsize))
    if stages < 2:
        raise ValueError(f"block_k: K/V tiles of {bk}x{dim} do not fit SMEM twice next to the "
                         f"queries; use block_k=64")
    qk_scale = cfg.scale * _LOG2E
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def kernel(q_ref, qs_ref, k_ref, v_ref, lo_ref, hi_ref, meta_ref, o_ref, scratch):
        (q_smem, qs_smem, k_smem, v_smem, lo_smem, hi_smem,
         q_bar, qs_bar, lo_bar, hi_bar, k_bar, v_bar, k_free, v_free, pingpong) = scratch
        b, h, c = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_blk")
        wg = lax.axis_index("wg")
        meta_row = meta_ref.at[b, c]
        count = meta_row[0]

        def pingpong_sync():
            plgpu.barrier_arrive(pingpong)
            plgpu.barrier_wait(pingpong)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            sink_blocks, sink_end, k_len = meta_row[1], meta_row[2], meta_row[3]
            q_base = c * (2 * bq) + wg * bq
            rows = pl.ds(q_base, bq)
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[wg], q_bar.at[wg])
            plgpu.copy_gmem_to_smem(lo_ref.at[b, rows], lo_smem.at[wg], lo_bar.at[wg])
            plgpu.copy_gmem_to_smem(hi_ref.at[b, rows], hi_smem.at[wg], hi_bar.at[wg])
            if dual:
                plgpu.copy_gmem_to_smem(qs_ref.at[b, rows, h], qs_smem.at[wg], qs_bar.at[wg])
                plgpu.barrier_wait(qs_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            plgpu.barrier_wait(lo_bar.at[wg])
            plgpu.barrier_wait(hi_bar.at[wg])
            lo = plgpu.load(lo_smem.at[wg], (), layout=row_layout)
            hi = plgpu.load(hi_smem.at[wg], (), layout=row_layout)
            lo2 = lax.broadcast_in_dim(lo, (bq, bk), [0])
            hi2 = lax.broadcast_in_dim(hi, (bq, bk), [0])
            cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=wgmma_layout)
            v_rows = plgpu.broadcasted_iota(jnp.int32, (bk, dim), 0, layout=wgmma_layout)

            def scores(a_smem, slot):
                def body(acc_ref):
                    plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    return acc_ref[...]
                return pl.run_scoped(body, plgpu.ACC((bq, bk), jnp.float32))

            def step(t, carry, with_sinks):
                m, l, acc = carry
                slot = lax.rem(t, stages)
                start = meta_row[_META + t] * bk
                plgpu.barrier_wait(k_bar.at[slot])
                s = scores(q_smem.at[wg], slot)
                j = cols + start
                if with_sinks:
                    s = jnp.where(j < sink_end, scores(qs_smem.at[wg], slot), s)
                plgpu.barrier_arrive(k_free.at[slot])
                pingpong_sync()
                full = meta_row[_META + (1 + wg) * max_blocks + t]

                def masked():
                    visible = (j <= hi2) & ((j >= lo2) | (j < sink_end))
                    return jnp.where(visible, s * qk_scale, -jnp.inf)
                s = lax.cond(full == 1, lambda: s * qk_scale, masked)
                m_new = jnp.maximum(m, s.max(axis=1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, (bq, bk), [0]))
                alpha = jnp.exp2(m - m_safe)
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, (bq, dim), [0])
                p = p.astype(dtype)
                plgpu.barrier_wait(v_bar.at[slot])

                @pl.when(start + bk > k_len)      # frames past the row's length may be NaN
                def _clean_values():
                    tile = v_smem.at[slot][...]
                    v_smem.at[slot][...] = jnp.where(v_rows + start < k_len, tile,
                                                     jnp.zeros_like(tile))
                    plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return m_new, l, acc

            carry = (plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout),
                     plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout),
                     plgpu.layout_cast(jnp.zeros((bq, dim), jnp.float32), wgmma_layout))
            pl.when(wg == 1)(pingpong_sync)
            if dual:
                carry = lax.fori_loop(0, sink_blocks, functools.partial(step, with_sinks=True),
                                      carry)
            carry = lax.fori_loop(sink_blocks if dual else 0, count,
                                  functools.partial(step, with_sinks=False), carry)
            pl.when(wg == 0)(pingpong_sync)
            _, l, acc = carry
            inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
            q_smem.at[wg][...] = (acc * lax.broadcast_in_dim(inv, (bq, dim), [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], o_ref.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_h = lax.div(h, jnp.int32(groups))

            def fetch(t, slot):
                kv_rows = pl.ds(meta_row[_META + t] * bk, bk)
                plgpu.copy_gmem_to_smem(k_ref.at[b, kv_rows, kv_h], k_smem.at[slot],
                                        k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, kv_rows, kv_h], v_smem.at[slot],
                                        v_bar.at[slot])

            for t0 in range(stages):
                pl.when(t0 < count)(functools.partial(fetch, t0, t0))

            @pl.loop(stages, jnp.maximum(count, stages))
            def _refill(t):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                fetch(t, slot)

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    tile = lambda *shape: plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))

    def entry(q_ref, qs_ref, k_ref, v_ref, lo_ref, hi_ref, meta_ref, o_ref):
        buffers = [tile(2, bq, dim), tile(2, bq, dim) if dual else None,
                   tile(stages, bk, dim), tile(stages, bk, dim),
                   plgpu.SMEM((2, bq), jnp.int32), plgpu.SMEM((2, bq), jnp.int32)]
        barriers = [plgpu.Barrier(num_barriers=2)] * 4 + [
            plgpu.Barrier(num_barriers=stages)] * 2 + [
            plgpu.Barrier(num_arrivals=2, num_barriers=stages)] * 2 + [
            plgpu.Barrier(num_arrivals=2)]
        pl.run_scoped(lambda *scratch: kernel(q_ref, qs_ref, k_ref, v_ref, lo_ref, hi_ref,
                                              meta_ref, o_ref, scratch),
                      *buffers, *barriers, collective_axes="wg")

    def entry_plain(q_ref, k_ref, v_ref, lo_ref, hi_ref, meta_ref, o_ref):
        entry(q_ref, None, k_ref, v_ref, lo_ref, hi_ref, meta_ref, o_ref)

    body = entry if dual else entry_plain
    args = (q, q_sinks, k, v, lo, hi, meta) if dual else (q, k, v, lo, hi, meta)
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(heads, num_cta_q, batch), grid_names=("heads", "q_blk", "batch"),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True))(*args)


__all__ = ["KERNEL", "attention", "attention_reference"]
