"""pallas_kernels.attention and pallas_kernels.masks: the row-bound / block-schedule logic
against the position rule by brute force; the portable kernel in interpret mode and the TPU
kernel in the TPU simulator against the dense reference (fresh random inputs, ragged lengths,
offsets, GQA, invalid frames poisoned with NaN, fp32 and bf16); gradients through the
custom_vjp; the Mosaic GPU / Triton kernels lower for cuda and the TPU kernel for tpu from the
CPU; the dispatcher; StreamingAttention offline through the kernel equals the XLA path.
GPU numerics run only where a GPU is the backend (`JAX_PLATFORMS=cuda pytest ... -k gpu`)."""

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
from streamzoo.pallas_kernels import attention as attn
from streamzoo.pallas_kernels import masks
from streamzoo.pallas_kernels.dispatch import default_impl, resolve_impl
from streamzoo.pallas_kernels.masks import MaskSpec

B, T, H, HKV, D = 3, 40, 4, 2, 16
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}

# Static mask configurations (each is one compile per implementation).
CASES = {
    "causal": dict(max_past=None, max_future=0),
    "window_sinks_future": dict(max_past=6, max_future=2, num_sinks=3),
    "chunk_left1_sinks": dict(max_past=None, max_future=None, chunk_size=8, left_chunks=1,
                              num_sinks=2),
}


def inputs(key, dtype=jnp.float32, tq=T, tk=T, lengths=(T, 23, 0), offsets=(0, 5, 17),
           k_lengths=None):
    """Random q, k, v, q_sinks; frames past each row's length poisoned with NaN."""
    kq, kk, kv, ks = jax.random.split(key, 4)
    lengths = jnp.array(lengths, jnp.int32)
    k_lengths = lengths if k_lengths is None else jnp.array(k_lengths, jnp.int32)
    q = jax.random.normal(kq, (B, tq, H, D), jnp.float32)
    k = jax.random.normal(kk, (B, tk, HKV, D), jnp.float32)
    v = jax.random.normal(kv, (B, tk, HKV, D), jnp.float32)
    qs = jax.random.normal(ks, (B, tq, H, D), jnp.float32)
    poison = lambda x, n: jnp.where((jnp.arange(x.shape[1])[None] < jnp.minimum(
        n, x.shape[1])[:, None])[:, :, None, None], x, jnp.nan).astype(dtype)
    return dict(q=poison(q, lengths), k=poison(k, k_lengths), v=poison(v, k_lengths),
                q_sinks=poison(qs, lengths), lengths=lengths, k_lengths=k_lengths,
                offsets=jnp.array(offsets, jnp.int32))


@functools.partial(jax.jit, static_argnames=("impl", "case", "dual", "block_q", "block_k"))
def run(data, *, impl, case, dual, block_q=None, block_k=None):
    return attn.attention(data["q"], data["k"], data["v"], lengths=data["lengths"],
                          q_offsets=data["offsets"], k_offsets=data["offsets"],
                          q_sinks=data["q_sinks"] if dual else None, impl=impl,
                          block_q=block_q, block_k=block_k, **CASES[case])


def reference(data, case, dual):
    return attn.attention_reference(
        data["q"], data["k"], data["v"], lengths=data["lengths"], q_offsets=data["offsets"],
        k_offsets=data["offsets"], q_sinks=data["q_sinks"] if dual else None, **CASES[case])


def assert_close(out, ref, dtype):
    assert not jnp.isnan(out).any()
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=TOL[dtype], rtol=TOL[dtype])


# ----------------------------------------------------------------------------- the masks
MASK_SPECS = [MaskSpec(None, 0), MaskSpec(5, 0), MaskSpec(5, 3, 2), MaskSpec(0, None, 1),
              MaskSpec(None, None, 0, 4), MaskSpec(3, None, 2, 4, 1), MaskSpec(None, 0, 1, 6, 0)]


@pytest.mark.parametrize("spec", MASK_SPECS, ids=str)
def test_row_bounds_and_schedule_match_the_rule(spec, key):
    tq, tk, bq, bk = 24, 28, 8, 4
    k1, k2 = jax.random.split(key)
    q_len = jnp.array([24, 11, 0])
    k_len = jnp.array([28, 9, 5])
    k_off = jax.random.randint(k1, (B,), 0, 6)
    # contiguous queries for row 0 and 1, arbitrary (shuffled) positions for row 2
    q_pos = jnp.stack([jnp.arange(tq) + 3, jnp.arange(tq), jax.random.permutation(k2, tq) + 2])
    q_valid = jnp.arange(tq)[None] < jnp.array([24, 11, 20])[:, None]
    del q_len
    k_pos = k_off[:, None] + jnp.arange(tk)
    k_valid = jnp.arange(tk)[None] < k_len[:, None]
    truth = (spec.visible(q_pos[:, :, None], k_pos[:, None, :]) & q_valid[:, :, None]
             & k_valid[:, None, :])
    lo, hi, sink_end = masks.row_bounds(spec, q_pos, q_valid, k_off, k_len)
    got = masks.visible_from_bounds(jnp.arange(tk)[None, None], lo[..., None], hi[..., None],
                                    sink_end[:, None, None])
    np.testing.assert_array_equal(got, truth)
    # Block liveness is exact: a block is scheduled iff it holds a visible pair.
    nk = tk // bk
    live = masks.live_blocks(lo, hi, sink_end, bq, bk, nk)
    brute = truth.reshape(B, tq // bq, bq, nk, bk).any(axis=(2, 4))
    np.testing.assert_array_equal(live, brute)
    blocks, count, _ = masks.block_schedule(lo, hi, sink_end, bq, bk, nk, nk)
    for b in range(B):
        for i in range(tq // bq):
            n = int(count[b, i])
            np.testing.assert_array_equal(np.asarray(blocks[b, i, :n]),
                                          np.flatnonzero(np.asarray(brute[b, i])))
    # Blocks flagged fully visible (mask skipped) are, for every row of the 4-row group.
    full = masks.full_blocks(lo, hi, blocks, 4, bk)
    for b, i, g, t in zip(*np.nonzero(np.asarray(full))):
        kb = int(blocks[b, i, t])
        assert np.asarray(truth)[b, i * bq + g * 4: i * bq + g * 4 + 4,
                                 kb * bk: kb * bk + bk].all()
    # The static bound holds for the contiguous rows.
    bound = spec.max_key_blocks(bq, bk, nk)
    assert int(count[:2].max()) <= bound


def test_max_key_blocks_is_tight_for_a_window():
    spec = MaskSpec(max_past=1024, max_future=0, num_sinks=4)
    # 128 queries + 1024 past keys span 1152 positions: 10 blocks of 128 at worst, + 1 sink.
    assert spec.max_key_blocks(128, 128, 128) == 11
    assert MaskSpec(None, 0).max_key_blocks(128, 128, 32) == 32
    with pytest.raises(ValueError, match="left_chunks"):
        MaskSpec(left_chunks=1)


# ----------------------------------------------------------- interpret / TPU simulator
@pytest.mark.parametrize("case,dual", [("causal", False), ("window_sinks_future", True),
                                       ("chunk_left1_sinks", False)])
def test_interpret_matches_reference(case, dual, key):
    data = inputs(key)
    out = run(data, impl="interpret", case=case, dual=dual, block_q=16, block_k=16)
    assert_close(out, reference(data, case, dual), jnp.float32)
    assert (out[2] == 0).all()                                   # a row of length 0


def test_interpret_bfloat16(key):
    data = inputs(key, jnp.bfloat16)
    out = run(data, impl="interpret", case="window_sinks_future", dual=True, block_q=16,
              block_k=16)
    assert out.dtype == jnp.bfloat16
    assert_close(out, reference(data, "window_sinks_future", True), jnp.bfloat16)


def test_interpret_arbitrary_query_positions_and_key_lengths(key):
    """Queries at shuffled positions over a longer key sequence with its own lengths."""
    k1, k2 = jax.random.split(key)
    data = inputs(k1, tq=24, lengths=(24, 10, 3), k_lengths=(40, 31, 2))
    q_pos = jax.random.randint(k2, (B, 24), 0, T)
    kw = dict(lengths=data["lengths"], k_lengths=data["k_lengths"], q_positions=q_pos, max_past=9,
              num_sinks=2)
    out = jax.jit(lambda d: attn.attention(d["q"], d["k"], d["v"], impl="interpret",
                                           block_q=8, block_k=16, **kw))(data)
    ref = attn.attention_reference(data["q"], data["k"], data["v"], **kw)
    assert_close(out, ref, jnp.float32)


def test_gradients_match_reference(key):
    data = inputs(key, lengths=(T, 23, 9))
    cot = jax.random.normal(jax.random.key(7), (B, T, H, D))
    kw = dict(lengths=data["lengths"], max_past=6, max_future=2, num_sinks=3)

    def loss(fn, q, k, v, qs):
        return (jnp.nan_to_num(fn(q, k, v, q_sinks=qs, **kw)) * cot).sum()

    kernel = functools.partial(attn.attention, impl="interpret", block_q=16, block_k=16)
    args = (data["q"], data["k"], data["v"], data["q_sinks"])
    clean = jax.tree.map(lambda x: jnp.nan_to_num(x, nan=0.0), args)  # grads need finite inputs
    got = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2, 3)))(*clean)
    want = jax.grad(functools.partial(loss, attn.attention_reference), argnums=(0, 1, 2, 3))(
        *clean)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
        assert float(jnp.abs(w).max()) > 0


def test_tpu_kernel_in_tpu_interpret_mode(key):
    data = inputs(key)
    out = run(data, impl="tpu_interpret", case="window_sinks_future", dual=True, block_q=8,
              block_k=128)
    assert_close(out, reference(data, "window_sinks_future", True), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl,bq,bk", [("interpret", 8, 16), ("interpret", 32, 16),
                                        ("tpu_interpret", 16, 128)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sweep(case, impl, bq, bk, dtype, key):
    data = inputs(key, dtype, lengths=(T, 31, 5), offsets=(2, 0, 9))
    for dual in (False, True):
        out = run(data, impl=impl, case=case, dual=dual, block_q=bq, block_k=bk)
        assert_close(out, reference(data, case, dual), dtype)


# ---------------------------------------------------------------------------- lowering
def _lower(impl, spec, dual, platform, dtype=jnp.bfloat16, t=256, dim=64, bq=None, bk=None):
    q = jax.ShapeDtypeStruct((1, t, H, dim), dtype)
    kv = jax.ShapeDtypeStruct((1, t, HKV, dim), dtype)
    bq, bk = attn._blocks(impl, t, t, dim, bq, bk)
    cfg = attn._Config(impl, spec, dim ** -0.5, bq, bk, True)

    def f(q, k, v, qs):
        _, _, ints = attn._prepare(q, k, v, None, None, None, jnp.array([t - 5]), None,
                                   spec.max_past, spec.max_future, spec.num_sinks,
                                   spec.chunk_size, spec.left_chunks, qs, None)
        return attn._forward(cfg, q, k, v, qs, ints)

    return jax.jit(f).trace(q, kv, kv, q if dual else None).lower(
        lowering_platforms=(platform,)).as_text()


LOWER_SPECS = {"causal": MaskSpec(None, 0), "window_sinks": MaskSpec(64, 0, 4),
               "chunk": MaskSpec(None, None, 0, 64, 2)}


@pytest.mark.parametrize("name,dual", [("causal", False), ("window_sinks", True),
                                       ("chunk", False)])
def test_mosaic_gpu_kernel_lowers_for_cuda(name, dual):
    text = _lower("mosaic_gpu", LOWER_SPECS[name], dual, "cuda")
    assert "mosaic_gpu" in text


def test_mosaic_gpu_rejects_what_does_not_fit_smem():
    with pytest.raises(ValueError, match="block_k"):
        _lower("mosaic_gpu", LOWER_SPECS["causal"], True, "cuda", dim=256, bk=128)


def test_triton_kernel_lowers_for_cuda():
    assert "triton" in _lower("triton", LOWER_SPECS["window_sinks"], True, "cuda",
                              dtype=jnp.float32)


@pytest.mark.parametrize("name,dual", [("causal", False), ("window_sinks", True)])
def test_tpu_kernel_lowers_for_tpu(name, dual):
    assert "tpu_custom_call" in _lower("tpu", LOWER_SPECS[name], dual, "tpu", dim=128)


# -------------------------------------------------------------------------- dispatcher
def test_dispatch(key):
    data = inputs(key, tq=8, tk=8, lengths=(8, 5, 2))
    args = (data["q"], data["k"], data["v"])
    assert resolve_impl("auto", attn.KERNEL, attn._supported(data["q"])) == "xla"
    got = jax.jit(functools.partial(attn.attention, impl="auto"))(*args, lengths=data["lengths"])
    want = jax.jit(attn.attention_reference)(*args, lengths=data["lengths"])
    np.testing.assert_array_equal(got, want)
    with default_impl("interpret"):
        assert resolve_impl("auto", attn.KERNEL, attn._supported(data["q"])) == "interpret"
    with pytest.raises(ValueError, match="impl"):
        attn.attention(*args, impl="cuda")
    q64 = jax.random.normal(key, (1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a GPU"):
        attn.attention(q64, q64, q64, impl="mosaic_gpu")
    with pytest.raises(ValueError, match="has implementations"):       # float32: not Mosaic
        attn.attention(*args, impl="mosaic_gpu")


def test_bad_input_names_the_argument(key):
    data = inputs(key, tq=8, tk=8)
    q, k, v = data["q"], data["k"], data["v"]
    with pytest.raises(ValueError, match="^q:"):
        attn.attention(q[0], k, v)
    with pytest.raises(ValueError, match="^k:"):
        attn.attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="^k:"):
        attn.attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="^lengths:"):
        attn.attention(q, k, v, lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match="^max_past:"):
        attn.attention(q, k, v, max_past=-1)
    with pytest.raises(ValueError, match="^q_sinks:"):
        attn.attention(q, k, v, q_sinks=q[:, :4])
    with pytest.raises(ValueError, match="^block_q"):
        attn.attention(q, k, v, impl="tpu_interpret", block_q=12)


# ------------------------------------------------------------- the layer through kernels
LAYERS = {
    "legacy_window_sinks_future": dict(num_heads=4, num_kv_heads=2, max_past=5, max_future=2,
                                       num_sinks=2),
    "streaming_llm_cache_positions": dict(num_heads=4, num_kv_heads=2,
                                          policy=SinksWindow(num_sinks=2, window=6)),
}


@pytest.mark.parametrize("name", [
    pytest.param("legacy_window_sinks_future", marks=pytest.mark.slow),
    "streaming_llm_cache_positions"])
def test_layer_offline_through_the_kernel(name, key):
    model = StreamingAttention(D, **LAYERS[name], rngs=nnx.Rngs(params=0))
    x = sz.Seq.from_lengths(jax.random.normal(key, (B, 24, D)), jnp.array([24, 13, 1]))
    apply = jax.jit(lambda m, x: m(x))
    with default_impl("xla"):
        want = apply(model, x)
    with default_impl("interpret"):
        got = jax.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.values, want.values, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------- on a GPU backend
gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")


@gpu_only
@pytest.mark.parametrize("impl", ["mosaic_gpu", "triton"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dual", [False, True])
def test_gpu_kernels_match_reference(impl, case, dual, key):
    kq, kk, kv, ks = jax.random.split(key, 4)
    t, dim = 640, 128
    shape_q, shape_kv = (2, t, 8, dim), (2, t, 2, dim)
    q, qs = (jax.random.normal(x, shape_q, jnp.bfloat16) for x in (kq, ks))
    k, v = (jax.random.normal(x, shape_kv, jnp.bfloat16) for x in (kk, kv))
    lengths = jnp.array([t, 333])
    kw = dict(CASES[case], lengths=lengths, q_sinks=qs if dual else None)
    if case != "causal":
        kw.update(max_past=kw["max_past"] and 200, chunk_size=kw.get("chunk_size") and 64)
    out = jax.jit(lambda *a: attn.attention(*a, impl=impl, **kw))(q, k, v)
    ref = attn.attention_reference(q, k, v, **kw)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=3e-2, rtol=3e-2)
