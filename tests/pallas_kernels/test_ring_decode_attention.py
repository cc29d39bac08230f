"""pallas_kernels.ring_decode_attention: the portable kernel in interpret mode (one split and
split-K) and the TPU kernel in the TPU simulator against the dense reference, over ring caches
with shuffled slot positions, empty slots poisoned with NaN, sinks (also scored with separate
sink queries), look-ahead, chunks, GQA, Tq = 1 and Tq > 1, fp32 and bf16; the Mosaic GPU /
Triton kernels lower for cuda and the TPU kernel for tpu; the dispatcher; StreamingAttention's
streaming step through the kernel equals the XLA path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.layers.attention import StreamingAttention
from streamzoo.layers.kv_policies import SinksWindow
from streamzoo.pallas_kernels import ring_decode_attention as rd
from streamzoo.pallas_kernels.dispatch import default_impl, resolve_impl
from streamzoo.pallas_kernels.masks import MaskSpec

B, S, H, HKV, D = 3, 40, 4, 2, 16
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
CASES = {
    "full": dict(max_past=None),
    "window_sinks": dict(max_past=9, num_sinks=3),
    "future_chunk": dict(max_past=None, max_future=None, chunk_size=8, left_chunks=2,
                         num_sinks=1),
}


def ring_inputs(key, tq, dtype=jnp.float32):
    """A ring of S slots per row holding the newest positions of a stream (sinks in the first
    slots), shuffled, some slots empty (-1) and NaN-poisoned; queries just after."""
    kq, kk, kv, ks, kp = jax.random.split(key, 5)
    ends = jnp.array([57, 30, 6])            # positions committed per row: wrapped, full, short
    sinks = 3
    ring = S - sinks
    slot = jnp.arange(ring)
    newest = ends[:, None] - 1 - jnp.mod(ends[:, None] - 1 - slot, ring)
    ring_pos = jnp.where((newest >= sinks) & (newest >= 0), newest, -1)
    sink_pos = jnp.where(jnp.arange(sinks)[None] < ends[:, None], jnp.arange(sinks), -1)
    pos = jnp.concatenate([sink_pos, ring_pos], axis=1)
    perm = jax.vmap(lambda k: jax.random.permutation(k, S))(jax.random.split(kp, B))
    pos = jnp.take_along_axis(pos, perm, axis=1).at[0, 7].set(-1)   # a hole mid-ring
    empty = (pos < 0)[:, :, None, None]
    k = jnp.where(empty, jnp.nan, jax.random.normal(kk, (B, S, HKV, D))).astype(dtype)
    v = jnp.where(empty, jnp.nan, jax.random.normal(kv, (B, S, HKV, D))).astype(dtype)
    q = jax.random.normal(kq, (B, tq, H, D), dtype)
    qs = jax.random.normal(ks, (B, tq, H, D), dtype)
    q_pos = ends[:, None] + jnp.arange(tq) - 1
    lengths = jnp.array([tq, max(tq - 1, 1), tq])
    return dict(q=q, k=k, v=v, qs=qs, pos=pos, q_pos=q_pos, lengths=lengths)


@functools.partial(jax.jit, static_argnames=("impl", "case", "dual", "block_k", "num_splits"))
def run(d, *, impl, case, dual, block_k=None, num_splits=None):
    return rd.ring_decode_attention(d["q"], d["k"], d["v"], d["pos"], d["q_pos"],
                                    lengths=d["lengths"], q_sinks=d["qs"] if dual else None,
                                    impl=impl, block_k=block_k, num_splits=num_splits,
                                    **CASES[case])


def reference(d, case, dual):
    return rd.ring_decode_reference(d["q"], d["k"], d["v"], d["pos"], d["q_pos"],
                                    lengths=d["lengths"], q_sinks=d["qs"] if dual else None,
                                    **CASES[case])


def assert_close(out, ref, dtype):
    assert not jnp.isnan(out).any()
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=TOL[dtype], rtol=TOL[dtype])


def test_reference_matches_the_layers_reference(key):
    """Positions tagged per slot, sinks by position: the layer's rule on its assembled keys."""
    from streamzoo.layers.attention import attention_reference
    d = ring_inputs(key, 1)
    valid = d["pos"] >= 0
    clean = lambda x: jnp.where(valid[:, :, None, None], x, 0.0)
    want = jax.jit(attention_reference, static_argnums=(6, 7, 8))(
        d["q"], clean(d["k"]), clean(d["v"]), d["q_pos"], d["pos"], valid, 9, 0, 3)
    got = jax.jit(functools.partial(reference, case="window_sinks", dual=False))(d)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("case,dual,tq,splits", [
    ("full", False, 1, 1),
    ("window_sinks", True, 3, 2),
    ("future_chunk", False, 2, 3),
])
def test_interpret_matches_reference(case, dual, tq, splits, key):
    d = ring_inputs(key, tq)
    out = run(d, impl="interpret", case=case, dual=dual, block_k=16, num_splits=splits)
    assert_close(out, reference(d, case, dual), jnp.float32)


@pytest.mark.slow   # the kernel is dtype-generic; bf16 runs by default in test_attention.py
def test_interpret_bfloat16(key):
    d = ring_inputs(key, 2, jnp.bfloat16)
    out = run(d, impl="interpret", case="window_sinks", dual=True, block_k=16, num_splits=2)
    assert out.dtype == jnp.bfloat16
    assert_close(out, reference(d, "window_sinks", True), jnp.bfloat16)


@pytest.mark.slow   # the custom_vjp wiring; the attention kernel's gradient test runs by default
def test_gradients_match_reference(key):
    d = ring_inputs(key, 2)
    clean = lambda x: jnp.where((d["pos"] >= 0)[:, :, None, None], x, 0.0)
    d = dict(d, k=clean(d["k"]), v=clean(d["v"]))
    cot = jax.random.normal(jax.random.key(3), d["q"].shape)

    def loss(fn, q, k, v, qs):
        return (fn(q, k, v, d["pos"], d["q_pos"], lengths=d["lengths"], q_sinks=qs,
                   **CASES["window_sinks"]) * cot).sum()

    kernel = functools.partial(rd.ring_decode_attention, impl="interpret", block_k=16,
                               num_splits=2)
    args = (d["q"], d["k"], d["v"], d["qs"])
    got = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2, 3)))(*args)
    want = jax.grad(functools.partial(loss, rd.ring_decode_reference), argnums=(0, 1, 2, 3))(
        *args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_tpu_kernel_in_tpu_interpret_mode(key):
    d = ring_inputs(key, 2)
    out = run(d, impl="tpu_interpret", case="window_sinks", dual=True, block_k=128,
              num_splits=1)
    assert_close(out, reference(d, "window_sinks", True), jnp.float32)


def test_skips_blocks_outside_the_window():
    """Only key blocks holding a visible slot are scheduled (and so read)."""
    spec = MaskSpec(max_past=16, max_future=0, num_sinks=2)
    slots = jnp.arange(128)[None]                    # positions 0..127 in order
    cfg = rd._Config("interpret", spec, 1.0, 16, 16, 2)
    lo = jnp.full((1, 16), 127 - 16)                 # one valid query row at position 127
    hi = jnp.full((1, 16), -1).at[0, 0].set(127)
    entries, count = jax.jit(rd._schedule, static_argnums=(0, 4))(cfg, slots, lo, hi, 1)
    blocks = [sorted(set(np.asarray(entries[0, 0, s, :count[0, 0, s]] // 4).tolist()))
              for s in range(2)]
    # sinks in block 0 (split 0); window 111..127 in blocks 6, 7 (split 1)
    assert blocks == [[0], [6, 7]]
    assert int(entries[0, 0, 0, 0] % 4) == rd._HAS_SINK


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl,bk", [("interpret", 16), ("interpret", 32), ("tpu_interpret", 128)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tq", [1, 4])
def test_sweep(case, impl, bk, dtype, tq, key):
    d = ring_inputs(key, tq, dtype)
    for dual in (False, True):
        for splits in (1, 2):
            out = run(d, impl=impl, case=case, dual=dual, block_k=bk, num_splits=splits)
            assert_close(out, reference(d, case, dual), dtype)


# ---------------------------------------------------------------------------- lowering
def _lower(impl, spec, dual, platform, splits, dtype=jnp.bfloat16, slots=512, dim=128):
    q = jax.ShapeDtypeStruct((2, 2, 8, dim), dtype)
    cache = jax.ShapeDtypeStruct((2, slots, 2, dim), dtype)
    pos = jax.ShapeDtypeStruct((2, slots), jnp.int32)
    q_pos = jax.ShapeDtypeStruct((2, 2), jnp.int32)
    cfg = rd._config(impl, spec, dim ** -0.5, q, cache, None, splits)

    def f(q, k, v, pos, q_pos, qs):
        return rd._forward(cfg, q, k, v, pos, q_pos, jnp.ones(q_pos.shape, bool), qs)

    return jax.jit(f).trace(q, cache, cache, pos, q_pos, q if dual else None).lower(
        lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dual,splits", [(False, 1), (True, 3)])
def test_mosaic_gpu_kernel_lowers_for_cuda(dual, splits):
    assert "mosaic_gpu" in _lower("mosaic_gpu", MaskSpec(256, 0, 4), dual, "cuda", splits)


def test_triton_kernel_lowers_for_cuda():
    assert "triton" in _lower("triton", MaskSpec(256, 0, 4), True, "cuda", 2, jnp.float32)


@pytest.mark.parametrize("dual,splits", [(False, 1), (True, 2)])
def test_tpu_kernel_lowers_for_tpu(dual, splits):
    assert "tpu_custom_call" in _lower("tpu", MaskSpec(256, 0, 4), dual, "tpu", splits)


# -------------------------------------------------------------------------- dispatcher
def test_dispatch_and_bad_input(key):
    d = ring_inputs(key, 1)
    args = (d["q"], d["k"], d["v"], d["pos"], d["q_pos"])
    assert resolve_impl("auto", rd.KERNEL, rd._supported(d["q"])) == "xla"
    got = jax.jit(functools.partial(rd.ring_decode_attention, impl="auto", max_past=9))(*args)
    np.testing.assert_array_equal(got, jax.jit(functools.partial(
        rd.ring_decode_reference, max_past=9))(*args))
    assert not jnp.isnan(got).any()
    with pytest.raises(ValueError, match="^impl"):
        rd.ring_decode_attention(*args, impl="gpu")
    with pytest.raises(ValueError, match="^impl"):
        rd.ring_decode_attention(*args, impl="tpu")                     # needs a TPU
    with pytest.raises(ValueError, match="^slot_positions"):
        rd.ring_decode_attention(*args[:3], d["pos"][:, :5], d["q_pos"])
    with pytest.raises(ValueError, match="^q_positions"):
        rd.ring_decode_attention(*args[:4], d["q_pos"].astype(jnp.float32))
    with pytest.raises(ValueError, match="^v_cache"):
        rd.ring_decode_attention(d["q"], d["k"], d["v"][:, :4], d["pos"], d["q_pos"])
    with pytest.raises(ValueError, match="^num_splits"):
        rd.ring_decode_attention(*args, impl="interpret", num_splits=0)


# ------------------------------------------------------------- the layer through kernels
@pytest.mark.parametrize("config", [
    dict(num_heads=4, num_kv_heads=2, max_past=5, max_future=2, num_sinks=2),
    dict(num_heads=4, num_kv_heads=2, policy=SinksWindow(num_sinks=2, window=6)),
], ids=["legacy_future_sinks", "streaming_llm_cache_positions"])
def test_layer_step_through_the_kernel(config, key):
    """Chunks longer than the ring, so it wraps; rows desynchronised by their lengths."""
    model = StreamingAttention(D, **config, rngs=nnx.Rngs(params=0))
    x = sz.Seq.from_lengths(jax.random.normal(key, (B, 24, D)), jnp.array([24, 13, 1]))

    def stream(model, x):
        carry = model.init_carry(B)
        outs = []
        for start in (0, 12):
            carry, y = model.step(carry, x.time_slice(start, start + 12))
            outs.append(y)
        carry, y = model.flush(carry)
        return outs + [y]

    stream = jax.jit(stream)
    with default_impl("xla"):
        want = stream(model, x)
    with default_impl("interpret"):
        got = stream(model, x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.mask, w.mask)
        np.testing.assert_allclose(g.values, w.values, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------- on a GPU backend
gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")


@gpu_only
@pytest.mark.parametrize("impl", ["mosaic_gpu", "triton"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("tq,splits", [(1, 1), (1, 4), (5, 2)])
def test_gpu_kernels_match_reference(impl, case, dual, tq, splits, key):
    kq, kk, kv, ks = jax.random.split(key, 4)
    slots, heads, kv_heads, dim = 1024, 8, 2, 128
    k, v = (jax.random.normal(x, (2, slots, kv_heads, dim), jnp.bfloat16) for x in (kk, kv))
    q, qs = (jax.random.normal(x, (2, tq, heads, dim), jnp.bfloat16) for x in (kq, ks))
    pos = jnp.stack([jnp.roll(jnp.arange(slots) + 300, 77),
                     jnp.where(jnp.arange(slots) < 500, jnp.arange(slots), -1)])
    k = jnp.where((pos < 0)[:, :, None, None], jnp.nan, k)
    v = jnp.where((pos < 0)[:, :, None, None], jnp.nan, v)
    q_pos = jnp.array([[slots + 300 + t for t in range(tq)], [500 + t for t in range(tq)]])
    kw = dict(CASES[case], q_sinks=qs if dual else None)
    if kw.get("max_past"):
        kw["max_past"] = 400
    out = jax.jit(lambda *a: rd.ring_decode_attention(*a, impl=impl, num_splits=splits, **kw))(
        q, k, v, pos, q_pos)
    ref = rd.ring_decode_reference(q, k, v, pos, q_pos, **kw)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=3e-2, rtol=3e-2)
