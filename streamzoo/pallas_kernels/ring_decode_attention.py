"""Attention of a chunk of new queries over a ring-buffer KV cache whose slots carry absolute
positions: the streaming step of `StreamingAttention` (decode, Tq >= 1).

`ring_decode_attention(q, k_cache, v_cache, slot_positions, q_positions, ...)`: slot s of row
b holds the key of position `slot_positions[b, s]` (-1: empty; the slot's data may then be
anything, NaN included), in any order (a ring, sink slots, the chunk's own keys appended).
Query t sees slot s when the slot is filled and the mask of `streamzoo.pallas_kernels.masks`
holds for (q_positions[b, t], slot_positions[b, s]) (window, sinks, look-ahead, chunks).

Kernels work per (row, KV head): the `G = H / Hkv` query heads of a KV head and the Tq
queries are packed into one tile of `Tq * G` rows, so each key block is read once per KV
head. Long caches are split into `num_splits` ranges processed in parallel (split-K); each
returns its normalised partial output and log-sum-exp, and a jnp epilogue merges them.
Within a split, a jnp pre-pass lists the key blocks holding at least one visible (query,
slot) pair: empty or out-of-window blocks are neither read nor computed.

Implementations (`impl=`): "xla" (the dense jnp reference), "mosaic_gpu" (TMA + WGMMA,
a producer warpgroup streaming K/V/positions through a 4-deep SMEM ring; bf16/f16,
head_dim % 64 == 0), "triton" / "interpret" (the portable Pallas kernel), "tpu" /
"tpu_interpret" (Mosaic TPU). Gradients (a streamed step under `jax.grad`) come from the
reference backward through a `custom_vjp`.
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

KERNEL = "ring_decode_attention"
_LOG2E = math.log2(math.e)
_LANES = 128
# Schedule entries: key block index * 4 + flags.
_HAS_EMPTY = 1   # the block has empty slots (their values may be NaN: zero them first)
_HAS_SINK = 2    # the block has sink slots (scored with q_sinks when given)
_META = 1        # per (row, query block, split): count, then the entries


# ------------------------------------------------------------------------------ reference
def _reference(spec: MaskSpec, scale, q, k, v, slot_pos, q_pos, q_valid, q_sinks):
    batch, tq, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups, dtype, f32 = heads // kv_heads, q.dtype, jnp.float32
    filled = slot_pos >= 0
    clean = lambda x, ok: jnp.where(ok[:, :, None, None], x.astype(f32), 0.0)
    q, k, v = clean(q, q_valid), clean(k, filled), clean(v, filled)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q.reshape(batch, tq, kv_heads, groups, dim), k)
    if q_sinks is not None:
        qs = clean(q_sinks, q_valid).reshape(batch, tq, kv_heads, groups, dim)
        sink_scores = jnp.einsum("bqhgd,bkhd->bhgqk", qs, k)
        scores = jnp.where((slot_pos < spec.num_sinks)[:, None, None, None], sink_scores, scores)
    mask = spec.visible(q_pos[:, :, None], slot_pos[:, None, :])
    mask &= filled[:, None, :] & q_valid[:, :, None]
    scores = jnp.where(mask[:, None, None], scores * scale, -jnp.inf)
    top = scores.max(axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v)
    return out.reshape(batch, tq, heads, dim).astype(dtype)


def ring_decode_reference(q, k_cache, v_cache, slot_positions, q_positions, *, lengths=None,
                          max_past=None, max_future=0, num_sinks=0, chunk_size=None,
                          left_chunks=None, q_sinks=None, scale=None):
    """`ring_decode_attention` in dense jnp (same arguments, no `impl`)."""
    spec, scale, slot_pos, q_pos, q_valid = _prepare(
        q, k_cache, v_cache, slot_positions, q_positions, lengths, max_past, max_future,
        num_sinks, chunk_size, left_chunks, q_sinks, scale)
    return _reference(spec, scale, q, k_cache, v_cache, slot_pos, q_pos, q_valid, q_sinks)


# ------------------------------------------------------------------------------ the API
def ring_decode_attention(q, k_cache, v_cache, slot_positions, q_positions, *, lengths=None,
                          max_past=None, max_future=0, num_sinks=0, chunk_size=None,
                          left_chunks=None, q_sinks=None, scale=None, impl="auto",
                          block_k=None, num_splits=None):
    """Queries over a position-tagged KV cache (see the module docstring).

    q `[B, Tq, H, D]`; k_cache, v_cache `[B, S, Hkv, D]` (one dtype, H a multiple of Hkv);
    slot_positions `[B, S]` int (-1 = empty); q_positions `[B, Tq]` int (>= 0);
    lengths `[B]`: valid queries (default Tq; the others output zeros). Mask: `max_past`,
    `max_future`, `num_sinks`, `chunk_size`, `left_chunks` as in `attention`; `q_sinks`
    (like q): the queries scored against sink slots (positions < num_sinks).
    `block_k`: cache slots per tile; `num_splits`: split-K ranges (default: enough programs
    to fill a GPU, 1 elsewhere). Returns `[B, Tq, H, D]` in q's dtype.
    """
    spec, scale, slot_pos, q_pos, q_valid = _prepare(
        q, k_cache, v_cache, slot_positions, q_positions, lengths, max_past, max_future,
        num_sinks, chunk_size, left_chunks, q_sinks, scale)
    impl = resolve_impl(impl, KERNEL, _supported(q))
    if impl == "xla":
        return _reference(spec, scale, q, k_cache, v_cache, slot_pos, q_pos, q_valid, q_sinks)
    cfg = _config(impl, spec, scale, q, k_cache, block_k, num_splits)
    return _ring_decode(cfg, q, k_cache, v_cache, q_sinks, (slot_pos, q_pos, q_valid))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_decode(cfg, q, k, v, q_sinks, ints):
    slot_pos, q_pos, q_valid = ints
    return _forward(cfg, q, k, v, slot_pos, q_pos, q_valid, q_sinks)


def _ring_decode_fwd(cfg, q, k, v, q_sinks, ints):
    return _ring_decode(cfg, q, k, v, q_sinks, ints), (q, k, v, q_sinks, ints)


def _ring_decode_bwd(cfg, res, g):
    """The reference backward (recomputed), so that a streamed step stays differentiable."""
    q, k, v, q_sinks, (slot_pos, q_pos, q_valid) = res
    fn = lambda q, k, v, qs: _reference(cfg.spec, cfg.scale, q, k, v, slot_pos, q_pos, q_valid,
                                        qs)
    dq, dk, dv, dqs = jax.vjp(fn, q, k, v, q_sinks)[1](g)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), (slot_pos, q_pos,
                                                                         q_valid))
    return dq, dk, dv, dqs, zeros


_ring_decode.defvjp(_ring_decode_fwd, _ring_decode_bwd)


def _supported(q):
    mosaic_ok = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 64 == 0
    return (("mosaic_gpu",) if mosaic_ok else ()) + ("triton", "tpu", "interpret")


def _prepare(q, k, v, slot_positions, q_positions, lengths, max_past, max_future, num_sinks,
             chunk_size, left_chunks, q_sinks, scale):
    for name, x in (("q", q), ("k_cache", k), ("v_cache", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: expected rank 4 [B, T, heads, head_dim], got shape "
                             f"{jnp.shape(x)}")
    batch, tq, heads, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {k.shape}, got {v.shape}")
    if k.shape[0] != batch or k.shape[3] != dim or heads % k.shape[2]:
        raise ValueError(f"k_cache: expected [B={batch}, S, Hkv dividing {heads}, D={dim}], "
                         f"got {k.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"k_cache, v_cache: expected q's dtype {q.dtype}, got {k.dtype} and "
                         f"{v.dtype}")
    if q_sinks is not None and (q_sinks.shape != q.shape or q_sinks.dtype != q.dtype):
        raise ValueError(f"q_sinks: expected {q.dtype}{list(q.shape)}, got "
                         f"{q_sinks.dtype}{list(q_sinks.shape)}")

    def ints(name, x, shape):
        x = jnp.asarray(x)
        if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name}: expected an int array of shape {shape}, got "
                             f"{x.dtype}{list(x.shape)}")
        return x.astype(jnp.int32)

    slot_pos = ints("slot_positions", slot_positions, (batch, k.shape[1]))
    q_pos = ints("q_positions", q_positions, (batch, tq))
    q_len = jnp.full((batch,), tq, jnp.int32) if lengths is None else ints(
        "lengths", lengths, (batch,))
    q_valid = jnp.arange(tq)[None] < q_len[:, None]
    spec = MaskSpec(max_past, max_future, num_sinks, chunk_size, left_chunks)
    return spec, dim ** -0.5 if scale is None else scale, slot_pos, q_pos, q_valid


# ------------------------------------------------------------------------ kernel plumbing
@dataclasses.dataclass(frozen=True)
class _Config:
    impl: str
    spec: MaskSpec
    scale: float
    block_m: int       # packed query rows (Tq * G) per tile
    block_k: int       # cache slots per tile
    num_splits: int


def _round_up(n, m):
    return -(-n // m) * m


def _pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _config(impl, spec, scale, q, k, block_k, num_splits):
    batch, tq, heads, dim = q.shape
    slots, kv_heads = k.shape[1], k.shape[2]
    rows = tq * (heads // kv_heads)
    if impl == "mosaic_gpu":
        bm, bk = 64, block_k or (128 if dim <= 128 else 64)
        if bk not in (64, 128):
            raise ValueError(f"block_k: Mosaic GPU takes 64 or 128, got {bk}")
    elif impl in ("tpu", "tpu_interpret"):
        bm, bk = min(128, _round_up(rows, 8)), block_k or 128
        if bk % 128:
            raise ValueError(f"block_k: TPU needs a multiple of 128, got {bk}")
    else:
        bm, bk = max(16, min(64, _pow2(rows))), block_k or max(16, min(64, _pow2(slots)))
        if impl == "triton" and (bk != _pow2(bk) or bk < 16):
            raise ValueError(f"block_k: Triton needs a power of two >= 16, got {bk}")
    num_k_blocks = -(-slots // bk)
    if num_splits is None:
        programs = batch * kv_heads * (-(-rows // bm))
        wanted = -(-264 // programs) if impl in ("mosaic_gpu", "triton") else 1  # 2 per SM
        num_splits = max(1, min(num_k_blocks, wanted))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits: expected an int >= 1, got {num_splits!r}")
    return _Config(impl, spec, float(scale), bm, bk, min(num_splits, num_k_blocks))


def _schedule(cfg, slot_pos, lo, hi, num_row_blocks):
    """Per (row, query block, split): entries `block * 4 + flags` of the live key blocks
    (ascending, padded by repetition) and their count. lo/hi `[B, R_pad]`."""
    batch, slots_pad = slot_pos.shape
    bm, bk, splits = cfg.block_m, cfg.block_k, cfg.num_splits
    nk = slots_pad // bk
    per_split = -(-nk // splits)
    sp = slot_pos.reshape(batch, 1, 1, nk, bk)
    lo_r = lo.reshape(batch, num_row_blocks, bm, 1, 1)
    hi_r = hi.reshape(batch, num_row_blocks, bm, 1, 1)
    sinks = cfg.spec.num_sinks
    visible = (sp >= 0) & (sp <= hi_r) & ((sp >= lo_r) | (sp < sinks))
    live = visible.any(axis=(2, 4))                                       # [B, nrb, nk]
    live = jnp.pad(live, ((0, 0), (0, 0), (0, splits * per_split - nk)))
    local, count = masks.compact_blocks(live.reshape(batch, num_row_blocks, splits, per_split),
                                        per_split)
    block = local + (jnp.arange(splits, dtype=jnp.int32) * per_split)[:, None]
    block = jnp.minimum(block, nk - 1)
    slots = slot_pos.reshape(batch, nk, bk)
    flags = ((slots < 0).any(-1) * _HAS_EMPTY
             + ((slots >= 0) & (slots < sinks)).any(-1) * _HAS_SINK).astype(jnp.int32)
    flag = jnp.take_along_axis(flags, block.reshape(batch, -1), axis=1).reshape(block.shape)
    return block * 4 + flag, count


def _forward(cfg, q, k, v, slot_pos, q_pos, q_valid, q_sinks):
    batch, tq, heads, dim = q.shape
    slots, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    rows = tq * groups
    bm, bk = cfg.block_m, cfg.block_k
    rows_pad, slots_pad = _round_up(rows, bm), _round_up(slots, bk)   # no copy if S % bk == 0
    nrb = rows_pad // bm
    lo, hi = masks.slot_row_bounds(cfg.spec, q_pos, q_valid)

    def pack(x):   # [B, Tq, H, D] -> [B, Hkv, R_pad, D], row t * G + g
        x = x.reshape(batch, tq, kv_heads, groups, dim).transpose(0, 2, 1, 3, 4)
        return jnp.pad(x.reshape(batch, kv_heads, rows, dim),
                       ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))

    per_row = lambda x, fill: jnp.pad(jnp.repeat(x, groups, axis=1),
                                      ((0, 0), (0, rows_pad - rows)), constant_values=fill)
    lo, hi = per_row(lo, 0), per_row(hi, -1)
    slot_pos = jnp.pad(slot_pos, ((0, 0), (0, slots_pad - slots)), constant_values=-1)
    pad_s = lambda x: jnp.pad(x, ((0, 0), (0, slots_pad - slots), (0, 0), (0, 0)))
    k, v = pad_s(k), pad_s(v)
    entries, count = _schedule(cfg, slot_pos, lo, hi, nrb)
    q_rows = pack(q)
    qs_rows = None if q_sinks is None else pack(q_sinks)
    run = {"mosaic_gpu": _mosaic_gpu_partials, "tpu": _tpu_partials,
           "tpu_interpret": _tpu_partials}.get(cfg.impl, _portable_partials)
    out, lse = run(cfg, q_rows, qs_rows, k, v, slot_pos, lo, hi, entries, count)
    # out [B, Hkv, splits, R_pad, D], lse [B, Hkv, splits, R_pad]: merge the splits.
    if cfg.num_splits > 1:
        top = lse.max(axis=2, keepdims=True)
        w = jnp.exp(lse - jnp.where(top == -jnp.inf, 0.0, top))
        total = w.sum(axis=2)
        out = (w[..., None] * out.astype(jnp.float32)).sum(axis=2)
        out = out / jnp.where(total > 0, total, 1.0)[..., None]
    else:
        out = out[:, :, 0]
    out = out[:, :, :rows].reshape(batch, kv_heads, tq, groups, dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, tq, heads, dim).astype(q.dtype)


def _meta(entries, count):
    """`[B, nrb, splits, width]` int32: count then the entries (width a power of two)."""
    width = _pow2(_META + entries.shape[-1])
    pad = jnp.zeros(entries.shape[:-1] + (width - _META - entries.shape[-1],), jnp.int32)
    return jnp.concatenate([count[..., None], entries, pad], axis=-1)


# ------------------------------------------------------------- portable kernel (interpret,
# Triton): one program per (row, KV head, query block, split), a loop over its key blocks.
def _portable_kernel(meta_ref, lo_ref, hi_ref, q_ref, *refs, block_k, scale, sinks, dual):
    if dual:
        qs_ref, k_ref, v_ref, sp_ref, o_ref, lse_ref = refs
    else:
        (k_ref, v_ref, sp_ref, o_ref, lse_ref), qs_ref = refs, None
    q = q_ref[...]
    lo, hi = lo_ref[...][:, None], hi_ref[...][:, None]
    block_m, dim = q.shape
    prec = masks.matmul_precision(q.dtype)
    dims = (((1,), (1,)), ((), ()))

    def step(t, carry):
        m, l, acc = carry
        start = pl.multiple_of(lax.div(meta_ref[_META + t], 4) * block_k, block_k)
        kt, vt = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        sp = sp_ref[pl.ds(start, block_k)]
        s = lax.dot_general(q, kt, dims, precision=prec,
                            preferred_element_type=jnp.float32)
        if dual:
            s_sink = lax.dot_general(qs_ref[...], kt, dims, precision=prec,
                                     preferred_element_type=jnp.float32)
            s = jnp.where(sp[None, :] < sinks, s_sink, s)
        spr = sp[None, :]
        visible = (spr >= 0) & (spr <= hi) & ((spr >= lo) | (spr < sinks))
        vt = jnp.where(sp[:, None] >= 0, vt, jnp.zeros_like(vt))    # empty slots: maybe NaN
        return masks.online_softmax_step(s, visible, m, l, acc, vt, scale, prec)

    carry = (jnp.full((block_m, 1), -jnp.inf, jnp.float32), jnp.zeros((block_m, 1), jnp.float32),
             jnp.zeros((block_m, dim), jnp.float32))
    out, lse = masks.finish_softmax(*lax.fori_loop(0, meta_ref[0], step, carry))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _portable_partials(cfg, q, qs, k, v, slot_pos, lo, hi, entries, count):
    batch, kv_heads, rows_pad, dim = q.shape
    slots_pad = k.shape[1]
    bm, splits = cfg.block_m, cfg.num_splits
    nrb = rows_pad // bm
    dual = qs is not None
    meta = _meta(entries, count)
    grid = (batch, kv_heads, nrb, splits)
    q_spec = pl.BlockSpec((None, None, bm, dim), lambda b, h, r, s: (b, h, r, 0))
    kv_spec = pl.BlockSpec((None, slots_pad, None, dim), lambda b, h, r, s: (b, 0, h, 0))
    sp_spec = pl.BlockSpec((None, slots_pad), lambda b, h, r, s: (b, 0))
    row_spec = pl.BlockSpec((None, bm), lambda b, h, r, s: (b, r))
    meta_spec = pl.BlockSpec((None, None, None, meta.shape[-1]), lambda b, h, r, s: (b, r, s, 0))
    out_spec = pl.BlockSpec((None, None, None, bm, dim), lambda b, h, r, s: (b, h, s, r, 0))
    lse_spec = pl.BlockSpec((None, None, None, bm), lambda b, h, r, s: (b, h, s, r))
    in_specs = [meta_spec, row_spec, row_spec, q_spec] + [q_spec] * dual + [
        kv_spec, kv_spec, sp_spec]
    args = [meta, lo, hi, q] + ([qs] if dual else []) + [k, v, slot_pos]
    extra = {}
    if cfg.impl == "triton":
        from jax.experimental.pallas import triton as pltriton
        extra["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=2)
    kernel = functools.partial(_portable_kernel, block_k=cfg.block_k, scale=cfg.scale,
                               sinks=cfg.spec.num_sinks, dual=dual)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=[out_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, splits, rows_pad, dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, kv_heads, splits, rows_pad), jnp.float32)],
        interpret=cfg.impl == "interpret", name="streamzoo_ring_decode", **extra)(*args)


# ----------------------------------------------------------------- TPU kernel (Mosaic TPU)
def _tpu_kernel(entry_ref, count_ref, lo_ref, hi_ref, q_ref, *refs, scale, sinks, dual,
                num_row_blocks, num_splits, max_steps):
    if dual:
        qs_ref, k_ref, v_ref, sp_row_ref, sp_col_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (k_ref, v_ref, sp_row_ref, sp_col_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs
        qs_ref = None
    b, r, s, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    cell = (b * num_row_blocks + r) * num_splits + s
    dim = acc_ref.shape[-1]
    block_k = k_ref.shape[0]
    prec = masks.matmul_precision(q_ref.dtype)

    def lanes(x, n):
        return jnp.tile(x, (1, n // _LANES)) if n >= _LANES else x[:, :n]

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(t < count_ref[cell])
    def _update():
        dims = (((1,), (1,)), ((), ()))
        kt, vt = k_ref[...], v_ref[...]
        s_ = lax.dot_general(q_ref[...], kt, dims, precision=prec,
                             preferred_element_type=jnp.float32)
        sp = sp_row_ref[0:1, :]                                       # [1, block_k]
        if dual:
            s_sink = lax.dot_general(qs_ref[...], kt, dims, precision=prec,
                                     preferred_element_type=jnp.float32)
            s_ = jnp.where(sp < sinks, s_sink, s_)
        lo, hi = lanes(lo_ref[...], block_k), lanes(hi_ref[...], block_k)
        visible = (sp >= 0) & (sp <= hi) & ((sp >= lo) | (sp < sinks))
        s_ = jnp.where(visible, s_ * scale, -jnp.inf)
        vt = jnp.where(sp_col_ref[...] >= 0, vt, jnp.zeros_like(vt))
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, s_.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s_ - lanes(m_safe, block_k))
        alpha = jnp.exp(m_prev - m_safe)
        l_ref[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
        m_ref[...] = m_next
        pv = jnp.dot(p.astype(vt.dtype), vt, precision=prec,
                     preferred_element_type=jnp.float32)
        acc_ref[...] = lanes(alpha, dim) * acc_ref[...] + pv

    @pl.when(t == max_steps - 1)
    def _finish():
        l, m = l_ref[...], m_ref[...]
        safe = jnp.where(l > 0, l, 1.0)
        o_ref[...] = (acc_ref[...] * lanes(jnp.where(l > 0, 1.0 / safe, 0.0), dim)
                      ).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l > 0, m + jnp.log(safe), -jnp.inf)


def _tpu_partials(cfg, q, qs, k, v, slot_pos, lo, hi, entries, count):
    from jax.experimental.pallas import tpu as pltpu
    batch, kv_heads, rows_pad, dim = q.shape
    slots_pad = k.shape[1]
    bm, bk, splits = cfg.block_m, cfg.block_k, cfg.num_splits
    nrb, max_steps = rows_pad // bm, entries.shape[-1]
    dual = qs is not None
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)           # [B, Hkv, S, D]
    lanes = lambda x: jnp.broadcast_to(x[..., None], x.shape + (_LANES,))
    sp_row = jnp.broadcast_to(slot_pos[:, None, :], (batch, 8, slots_pad))
    sp_col = slot_pos[:, :, None]
    scalars = (lax.div(entries, 4).reshape(-1), count.reshape(-1))

    def block_of(b, r, s, t, blocks):
        return blocks[((b * nrb + r) * splits + s) * max_steps + t]

    def kv_map(b, h, r, s, t, blocks, _):
        return b, h, block_of(b, r, s, t, blocks), 0

    q_spec = pl.BlockSpec((None, None, bm, dim), lambda b, h, r, s, t, *_: (b, h, r, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dim), kv_map)
    sp_row_spec = pl.BlockSpec((None, 8, bk), lambda b, h, r, s, t, blocks, _: (
        b, 0, block_of(b, r, s, t, blocks)))
    sp_col_spec = pl.BlockSpec((None, bk, 1), lambda b, h, r, s, t, blocks, _: (
        b, block_of(b, r, s, t, blocks), 0))
    row_spec = pl.BlockSpec((None, bm, _LANES), lambda b, h, r, s, t, *_: (b, r, 0))
    out_spec = pl.BlockSpec((None, None, None, bm, dim), lambda b, h, r, s, t, *_: (b, h, s, r, 0))
    lse_spec = pl.BlockSpec((None, None, None, bm, _LANES),
                            lambda b, h, r, s, t, *_: (b, h, s, r, 0))
    in_specs = [row_spec, row_spec, q_spec] + [q_spec] * dual + [
        kv_spec, kv_spec, sp_row_spec, sp_col_spec]
    args = [lanes(lo), lanes(hi), q] + ([qs] if dual else []) + [k, v, sp_row, sp_col]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, kv_heads, nrb, splits, max_steps),
        in_specs=in_specs, out_specs=[out_spec, lse_spec],
        scratch_shapes=[pltpu.VMEM((bm, _LANES), jnp.float32),
                        pltpu.VMEM((bm, _LANES), jnp.float32),
                        pltpu.VMEM((bm, dim), jnp.float32)])
    kernel = functools.partial(_tpu_kernel, scale=cfg.scale, sinks=cfg.spec.num_sinks,
                               dual=dual, num_row_blocks=nrb, num_splits=splits,
                               max_steps=max_steps)
    out, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, splits, rows_pad, dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, kv_heads, splits, rows_pad, _LANES),
                                        jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=(
            "parallel", "parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if cfg.impl == "tpu_interpret" else False,
        name="streamzoo_ring_decode_tpu")(*scalars, *args)
    return out, lse[..., 0]


# -------------------------------------------------------------------- Mosaic GPU kernel
# One CTA per (KV head, query block x split, row): warpgroup 0 computes a 64-row tile of
# packed queries; warpgroup 1 streams the scheduled K, V and slot-position blocks through a
# ring of `_STAGES` SMEM slots with TMA. Blocks flagged as holding empty slots get their V
# rows zeroed in SMEM before the PV matmul (empty slots may hold NaN); blocks flagged as
# holding sinks are also scored with q_sinks.
_STAGES = 4                   # at most; fewer when the tiles do not fit
_SMEM_BUDGET = 220 * 1024     # of the H100/H200's 227 KiB per block


def _mosaic_gpu_partials(cfg, q, qs, k, v, slot_pos, lo, hi, entries, count):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    batch, kv_heads, rows_pad, dim = q.shape
    bm, bk, splits = cfg.block_m, cfg.block_k, cfg.num_splits
    nrb = rows_pad // bm
    dual = qs is not None
    dtype = q.dtype
    itemsize = jnp.dtype(dtype).itemsize
    fixed = (1 + dual) * bm * dim * itemsize + 3 * bm * 4 + 1024
    stages = min(_STAGES, (_SMEM_BUDGET - fixed) // (2 * bk * dim * itemsize + bk * 4))
    if stages < 2:
        raise ValueError(f"block_k: K/V tiles of {bk}x{dim} do not fit SMEM twice; use 64")
    sinks = cfg.spec.num_sinks
    qk_scale = cfg.scale * _LOG2E
    meta = _meta(entries, count)
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)

    def kernel(q_ref, qs_ref, k_ref, v_ref, sp_ref, lo_ref, hi_ref, meta_ref, o_ref, lse_ref,
               scratch):
        (q_smem, qs_smem, k_smem, v_smem, sp_smem, lo_smem, hi_smem, lse_smem,
         q_bar, qs_bar, lo_bar, hi_bar, k_bar, v_bar, sp_bar, k_free, v_free, sp_free) = scratch
        b, h, cell = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("cell")
        r, s = lax.div(cell, jnp.int32(splits)), lax.rem(cell, jnp.int32(splits))
        wg = lax.axis_index("wg")
        meta_row = meta_ref.at[b, r, s]
        count = meta_row[0]

        @pl.when(wg == 0)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            rows = pl.ds(r * bm, bm)
            plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem, q_bar.at[0])
            plgpu.copy_gmem_to_smem(lo_ref.at[b, rows], lo_smem, lo_bar.at[0])
            plgpu.copy_gmem_to_smem(hi_ref.at[b, rows], hi_smem, hi_bar.at[0])
            if dual:
                plgpu.copy_gmem_to_smem(qs_ref.at[b, h, rows], qs_smem, qs_bar.at[0])
                plgpu.barrier_wait(qs_bar.at[0])
            plgpu.barrier_wait(q_bar.at[0])
            plgpu.barrier_wait(lo_bar.at[0])
            plgpu.barrier_wait(hi_bar.at[0])
            lo = lax.broadcast_in_dim(plgpu.load(lo_smem, (), layout=row_layout), (bm, bk), [0])
            hi = lax.broadcast_in_dim(plgpu.load(hi_smem, (), layout=row_layout), (bm, bk), [0])

            def scores(a_smem, slot):
                def body(acc_ref):
                    plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    return acc_ref[...]
                return pl.run_scoped(body, plgpu.ACC((bm, bk), jnp.float32))

            def step(t, carry):
                m, l, acc = carry
                slot = lax.rem(t, stages)
                entry = meta_row[_META + t]
                plgpu.barrier_wait(sp_bar.at[slot])
                sp = lax.broadcast_in_dim(plgpu.load(sp_smem.at[slot], (), layout=col_layout),
                                          (bm, bk), [1])
                plgpu.barrier_wait(k_bar.at[slot])
                s_ = scores(q_smem, slot)
                if dual:
                    s_ = lax.cond(lax.rem(lax.div(entry, 2), 2) == 1,
                                  lambda: jnp.where(sp < sinks, scores(qs_smem, slot), s_),
                                  lambda: s_)
                plgpu.barrier_arrive(k_free.at[slot])
                visible = (sp >= 0) & (sp <= hi) & ((sp >= lo) | (sp < sinks))
                s_ = jnp.where(visible, s_ * qk_scale, -jnp.inf)
                m_new = jnp.maximum(m, s_.max(axis=1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp2(s_ - lax.broadcast_in_dim(m_safe, (bm, bk), [0]))
                alpha = jnp.exp2(m - m_safe)
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, (bm, dim), [0])
                p = p.astype(dtype)
                plgpu.barrier_wait(v_bar.at[slot])

                @pl.when(lax.rem(entry, 2) == 1)      # empty slots: their values may be NaN
                def _clean_values():
                    sp_rows = lax.broadcast_in_dim(
                        plgpu.load(sp_smem.at[slot], (), layout=row_layout), (bk, dim), [0])
                    tile = v_smem.at[slot][...]
                    v_smem.at[slot][...] = jnp.where(sp_rows >= 0, tile, jnp.zeros_like(tile))
                    plgpu.commit_smem()

                plgpu.barrier_arrive(sp_free.at[slot])

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return m_new, l, acc

            carry = (plgpu.layout_cast(jnp.full((bm,), -jnp.inf, jnp.float32), row_layout),
                     plgpu.layout_cast(jnp.zeros((bm,), jnp.float32), row_layout),
                     plgpu.layout_cast(jnp.zeros((bm, dim), jnp.float32), wgmma_layout))
            m, l, acc = lax.fori_loop(0, count, step, carry)
            safe = jnp.where(l > 0, l, 1.0)
            inv = jnp.where(l > 0, 1.0 / safe, 0.0)
            q_smem[...] = (acc * lax.broadcast_in_dim(inv, (bm, dim), [0])).astype(dtype)
            lse_smem[...] = jnp.where(l > 0, m / _LOG2E + jnp.log(safe), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, h, s, rows])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, s, rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(t, slot):
                start = lax.div(meta_row[_META + t], 4) * bk
                slots = pl.ds(start, bk)
                plgpu.copy_gmem_to_smem(sp_ref.at[b, slots], sp_smem.at[slot], sp_bar.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[b, slots, h], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, slots, h], v_smem.at[slot], v_bar.at[slot])

            for t0 in range(stages):
                pl.when(t0 < count)(functools.partial(fetch, t0, t0))

            @pl.loop(stages, jnp.maximum(count, stages))
            def _refill(t):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(sp_free.at[slot])
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                fetch(t, slot)

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    tile = lambda *shape: plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))

    def entry(q_ref, qs_ref, k_ref, v_ref, sp_ref, lo_ref, hi_ref, meta_ref, o_ref, lse_ref):
        buffers = [tile(bm, dim), tile(bm, dim) if dual else None,
                   tile(stages, bk, dim), tile(stages, bk, dim),
                   plgpu.SMEM((stages, bk), jnp.int32), plgpu.SMEM((bm,), jnp.int32),
                   plgpu.SMEM((bm,), jnp.int32), plgpu.SMEM((bm,), jnp.float32)]
        barriers = [plgpu.Barrier()] * 4 + [plgpu.Barrier(num_barriers=stages)] * 3 + [
            plgpu.Barrier(num_barriers=stages)] * 3
        pl.run_scoped(lambda *scratch: kernel(q_ref, qs_ref, k_ref, v_ref, sp_ref, lo_ref,
                                              hi_ref, meta_ref, o_ref, lse_ref, scratch),
                      *buffers, *barriers, collective_axes="wg")

    def entry_plain(q_ref, k_ref, v_ref, sp_ref, lo_ref, hi_ref, meta_ref, o_ref, lse_ref):
        entry(q_ref, None, k_ref, v_ref, sp_ref, lo_ref, hi_ref, meta_ref, o_ref, lse_ref)

    args = (q, qs, k, v, slot_pos, lo, hi, meta) if dual else (q, k, v, slot_pos, lo, hi, meta)
    out, lse = plgpu.kernel(
        entry if dual else entry_plain,
        out_type=[jax.ShapeDtypeStruct((batch, kv_heads, splits, rows_pad, dim), dtype),
                  jax.ShapeDtypeStruct((batch, kv_heads, splits, rows_pad), jnp.float32)],
        grid=(kv_heads, nrb * splits, batch), grid_names=("heads", "cell", "batch"),
        num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True))(*args)
    return out, lse


__all__ = ["KERNEL", "ring_decode_attention", "ring_decode_reference"]
