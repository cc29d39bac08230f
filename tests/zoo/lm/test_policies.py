"""KV-cache policies on `StreamingAttention`: the contract harness for every policy (all four
single policies as the four KV heads of one per-head layer, plus a long ring-wrapping run per
policy alone); cached decode against attention recomputed in float64 over exactly the kept set
at cache positions, after many ring wraps and with writes straddling the wrap point; absolute
vs cache positions; DuoAttention cache sizes; rollback; bad arguments."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.core import jitted_apply, jitted_step
from streamzoo.layers.attention import StreamingAttention
from streamzoo.layers.kv_policies import (FullCache, PerHead, SinksWindow, SlidingWindow,
                                          duo_attention)
from streamzoo.testing import assert_stream_contract

D, T = 16, 24
SINGLE = {
    "full": FullCache(6),
    "window": SlidingWindow(3),
    "sinks_window_cache": SinksWindow(2, 3),
    "sinks_window_absolute": SinksWindow(2, 3, positions="absolute"),
}
ALL_FOUR = PerHead(tuple(SINGLE.values()))  # KV head i keeps its cache under policy i


def make(policy, key, num_heads=8, num_kv_heads=4, **kw) -> StreamingAttention:
    return StreamingAttention(D, num_heads, num_kv_heads=num_kv_heads, head_dim=4, policy=policy,
                              use_bias=True, rngs=nnx.Rngs(params=key), **kw)


def ragged(key, lengths=(T, 13, 1), length=T) -> sz.Seq:
    values = jax.random.normal(key, (len(lengths), length, D))
    return sz.Seq.from_lengths(values, jnp.array(lengths))


def stream_rows(model, x: sz.Seq, sizes, carry=None):
    carry = model.init_carry(x.batch_size) if carry is None else carry
    outs, start = [], 0
    for size in sizes:
        carry, y = jitted_step(model, carry, x.time_slice(start, start + size))
        outs.append(y.rows())
        start += size
    return carry, [np.concatenate([o[b] for o in outs]) for b in range(x.batch_size)]


# --------------------------------------------------------------- float64 kept-set reference
def rope_np(x, positions, base=10000.0):
    """Rotate-half RoPE of `[n, Dh]` rows by `positions [n]` (float64, independent code)."""
    half = x.shape[-1] // 2
    ang = positions[:, None] * base ** (-np.arange(half) * 2.0 / x.shape[-1])
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def kept_set_reference(model: StreamingAttention, rows) -> list[np.ndarray]:
    """Per query p and head: softmax attention over exactly the kept set K(p) = sinks ∪
    {p - window .. p}, keys at cache positions 0..|K|-1 and the query at |K|-1 ("cache"
    mode) or at their stream positions ("absolute")."""
    h, hkv, dh = model.num_heads, model.num_kv_heads, model.head_dim
    rule = {kv: g for g in model.groups for kv in g.kv_heads}
    w = np.asarray(model.qkv.kernel[...], np.float64)
    b = np.asarray(model.qkv.bias[...], np.float64)
    wo, bo = np.asarray(model.out.kernel[...], np.float64), np.asarray(model.out.bias[...], np.float64)
    out = []
    for xb in rows:
        n = xb.shape[0]
        qkv = np.asarray(xb, np.float64) @ w + b
        q = qkv[:, :h * dh].reshape(n, h, dh)
        k = qkv[:, h * dh:(h + hkv) * dh].reshape(n, hkv, dh)
        v = qkv[:, (h + hkv) * dh:].reshape(n, hkv, dh)
        o = np.zeros((n, h, dh))
        for p in range(n):
            for head in range(h):
                g = rule[head // (h // hkv)]
                kept = [j for j in range(p + 1) if j < g.num_sinks or j >= p - g.max_past]
                kv = head // (h // hkv)
                if g.positions == "cache":
                    k_pos, q_pos = np.arange(len(kept)), len(kept) - 1
                else:
                    k_pos, q_pos = np.asarray(kept), p
                kr = rope_np(k[kept, kv], k_pos, model.rope_base)
                qr = rope_np(q[p:p + 1, head], np.array([q_pos]), model.rope_base)[0]
                s = kr @ qr / math.sqrt(dh)
                a = np.exp(s - s.max())
                o[p, head] = (a / a.sum()) @ v[kept, kv]
        out.append(o.reshape(n, h * dh) @ wo + bo)
    return out


# --------------------------------------------------------------------------------- tests
def test_harness_all_four_policies_as_heads_of_one_layer(key):
    """Full cache, window, sinks+window at cache and at absolute positions, one per KV head
    (each group its own cache): every check of the streaming contract but gradients (the LM's
    harness in test_model.py checks those through the same cache code)."""
    model = make(ALL_FOUR, key)
    assert [len(g.kv_heads) for g in model.groups] == [1, 1, 1, 1]
    assert_stream_contract(model, ragged(jax.random.fold_in(key, 1)), skip=("gradients",))


@pytest.mark.parametrize("name", ["full", "window"])
def test_each_policy_alone_long_run(name, key):
    """One cache group holding all heads (the layout without a per-head split): a run of
    several ring lengths whose first chunk is longer than the cache, in random chunks. (Sinks +
    window alone: the LM harness in test_model.py at cache positions, and
    tests/layers/test_attention.py at absolute positions.)"""
    model = make(SINGLE[name], key, num_heads=4, num_kv_heads=2)
    assert len(model.groups) == 1
    assert_stream_contract(model, ragged(jax.random.fold_in(key, 1)), checks=("long",))


@pytest.mark.parametrize("policy", [SinksWindow(2, 5), ALL_FOUR], ids=["sinks_window", "per_head"])
def test_cached_decode_equals_recompute_over_kept_set(policy, key):
    """Every output of a 61-frame stream (the 5-slot ring wraps 11 times), fed one frame at a
    time (cached decode) and in chunks of 3/4/7 that straddle the wrap point, equals the
    float64 recompute over the kept set with cache positions (fp32, 1e-5)."""
    model = make(policy, key)
    n = 61
    x = ragged(jax.random.fold_in(key, 1), lengths=(n, 47), length=n)
    want = kept_set_reference(model, x.rows())
    for sizes in ([1] * n, [3, 4, 7] * 4 + [5]):
        assert sum(sizes) == n
        carry, got = stream_rows(model, x, sizes)
        np.testing.assert_array_equal(np.asarray(carry.pos), [n, 47])
        for b in range(2):
            np.testing.assert_allclose(got[b], want[b], atol=1e-5, rtol=1e-5,
                                       err_msg=f"chunks {sizes[:3]}.. row {b}")
    # The offline call computes the same attention (the contract's reference).
    for b, row in enumerate(jitted_apply(model, x).rows()):
        np.testing.assert_allclose(row, want[b], atol=1e-5, rtol=1e-5)


def test_cache_positions_store_unrotated_keys_and_differ_only_once_sinks_are_far(key):
    cache, absolute = (make(SinksWindow(2, 3, positions=m), key, num_heads=4, num_kv_heads=2)
                       for m in ("cache", "absolute"))
    x = ragged(jax.random.fold_in(key, 1), lengths=(T,))
    y_c, y_a = (np.asarray(jitted_apply(m, x).values[0]) for m in (cache, absolute))
    # Up to p = sinks + window the kept set is contiguous: both modes agree.
    np.testing.assert_allclose(y_c[:6], y_a[:6], atol=1e-5)
    assert np.abs(y_c[6:] - y_a[6:]).max() > 1e-3
    # Without sinks the two modes are the same attention.
    win_c, win_a = (make(SlidingWindow(3, positions=m), key, num_heads=4, num_kv_heads=2)
                    for m in ("cache", "absolute"))
    np.testing.assert_allclose(jitted_apply(win_c, x).values, jitted_apply(win_a, x).values,
                               atol=1e-5)
    # Cache mode stores keys as projected (RoPE at attention time); absolute stores them rotated.
    carry, _ = jitted_step(cache, cache.init_carry(1), x.time_slice(0, 4))
    _, k_raw, _ = cache._project_raw(x.values[:, :4])
    np.testing.assert_allclose(carry.k[0, :2], k_raw[0, :2], atol=1e-6)
    carry, _ = jitted_step(absolute, absolute.init_carry(1), x.time_slice(0, 4))
    _, k_rot, _ = absolute._project(x.values[:, :4], jnp.arange(4)[None])
    np.testing.assert_allclose(carry.k[0, :2], k_rot[0, :2], atol=1e-6)


def test_duo_attention_gives_streaming_heads_small_caches(key):
    policy = duo_attention([True, False, False, True], max_cache=32, num_sinks=2, window=3)
    model = make(policy, key)
    full, streaming = model.groups
    assert full.kv_heads == (0, 3) and streaming.kv_heads == (1, 2)
    carry = model.init_carry(2)
    assert [k.shape for k in carry.k] == [(2, 32, 2, 4), (2, 5, 2, 4)]
    all_full = make(FullCache(32), key)
    assert sz.carry_nbytes(carry) < 0.6 * sz.carry_nbytes(all_full.init_carry(2))
    assert model.spec.receptive_field == (-math.inf, 0.0)


def test_rollback_is_exact_across_the_wrap(key):
    """Commit 13 frames, then 3 draft frames, roll 2 back and commit 2 others: the same
    carry and outputs as never having committed the rejected ones (ring of 4 + 3 spare)."""
    model = make(SinksWindow(1, 4), key, max_rollback=3)
    x = ragged(jax.random.fold_in(key, 1), lengths=(20, 20), length=20)
    other = ragged(jax.random.fold_in(key, 2), lengths=(2, 2), length=2)
    carry, _ = jitted_step(model, model.init_carry(2), x.time_slice(0, 13))
    drafted, _ = jitted_step(model, carry, x.time_slice(13, 16))
    rolled = jax.jit(lambda m, c, n: m.rollback(c, n))(model, drafted, jnp.array([2, 3]))
    np.testing.assert_array_equal(np.asarray(rolled.pos), [14, 13])
    kept = x.time_slice(13, 14).replace(mask=jnp.array([[True], [False]]))
    direct, _ = jitted_step(model, carry, kept)
    _, y_rolled = jitted_step(model, rolled, other)
    _, y_direct = jitted_step(model, direct, other)
    np.testing.assert_allclose(y_rolled.values, y_direct.values, atol=1e-6)
    with pytest.raises(ValueError, match="count"):
        model.rollback(carry, jnp.array([1.0, 2.0]))


@pytest.mark.parametrize("make_policy, name", [
    (lambda: FullCache(0), "max_cache"),
    (lambda: SlidingWindow(-1), "window"),
    (lambda: SinksWindow(-1, 3), "num_sinks"),
    (lambda: SinksWindow(2, 3, positions="relative"), "positions"),
    (lambda: PerHead(()), "head_policies"),
    (lambda: PerHead((FullCache(3), "window")), r"head_policies\[1\]"),
])
def test_bad_policies(make_policy, name):
    with pytest.raises(ValueError, match=name):
        make_policy()


@pytest.mark.parametrize("kwargs, name", [
    (dict(policy=PerHead((FullCache(3),) * 3)), "policy: expected one policy per KV head"),
    (dict(policy=SlidingWindow(3), max_past=3), "policy: pass either"),
    (dict(policy="window"), "policy: expected a KVPolicy"),
    (dict(policy=SlidingWindow(3), max_rollback=-1), "max_rollback"),
    (dict(policy=SlidingWindow(3), max_rollback=2, max_future=1), "max_rollback"),
    (dict(), "max_past"),
])
def test_bad_layer_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        StreamingAttention(D, 4, num_kv_heads=2, rngs=nnx.Rngs(0), **kwargs)
