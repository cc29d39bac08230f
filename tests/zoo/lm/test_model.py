"""StreamingLM: the contract harness (StreamingLLM sinks + window at cache positions, all ten
checks; DuoAttention's per-head split on a long run); the offline (training) path against a
float64 NumPy transformer; stacked [L, ...] params and carry; hidden states; KV-head
permutation; rollback; bfloat16; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.core import jitted_apply, jitted_step
from streamzoo.layers.kv_policies import FullCache, SinksWindow, SlidingWindow, duo_attention
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.lm.model import StreamingLM, permute_kv_heads, with_policy

V, D, L, H, HKV, HIDDEN, T = 32, 16, 2, 4, 2, 32, 20


def make(policy, key, **kw) -> StreamingLM:
    return StreamingLM(V, D, L, H, HKV, HIDDEN, policy=policy, rngs=nnx.Rngs(params=key), **kw)


def tokens(key, lengths=(T, 11, 3), length=T) -> sz.Seq:
    ids = jax.random.randint(key, (len(lengths), length), 0, V, dtype=jnp.int32)
    return sz.Seq.from_lengths(ids, jnp.array(lengths))


# ------------------------------------------------------------------ NumPy reference
def rope_np(x, positions, base=10000.0):
    half = x.shape[-1] // 2
    ang = positions[:, None, None] * base ** (-np.arange(half) * 2.0 / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def numpy_lm(model: StreamingLM, ids) -> np.ndarray:
    """Logits `[n, V]` of a plain full-causal pre-norm RoPE/GQA/SwiGLU transformer (float64)."""
    f64 = lambda a: np.asarray(a, np.float64)
    blocks = model.blocks.layers
    emb = f64(model.embed.embedding[...])
    dh, per = D // H, H // HKV
    n = len(ids)
    rms = lambda x, s: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * s
    h = emb[np.asarray(ids)]
    for l in range(L):
        x = rms(h, f64(blocks.attn_norm.scale[...])[l])
        qkv = x @ f64(blocks.attn.qkv.kernel[...])[l]
        q = rope_np(qkv[:, :H * dh].reshape(n, H, dh), np.arange(n))
        k = rope_np(qkv[:, H * dh:(H + HKV) * dh].reshape(n, HKV, dh), np.arange(n))
        v = qkv[:, (H + HKV) * dh:].reshape(n, HKV, dh)
        s = np.einsum("qhd,khd->hqk", q, np.repeat(k, per, axis=1)) / np.sqrt(dh)
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", a, np.repeat(v, per, axis=1)).reshape(n, H * dh)
        h = h + o @ f64(blocks.attn.out.kernel[...])[l]
        x = rms(h, f64(blocks.ffn_norm.scale[...])[l])
        up, gate = np.split(x @ f64(blocks.ffn.up.kernel[...])[l], 2, axis=-1)
        h = h + (up / (1 + np.exp(-up)) * gate) @ f64(blocks.ffn.down.kernel[...])[l]
    h = rms(h, f64(model.final_norm.scale[...]))
    return h @ (emb.T if model.tie_embeddings else f64(model.head.kernel[...]))


# ---------------------------------------------------------------------------- tests
def test_harness_sinks_window_cache_positions(key):
    """StreamingLLM's policy: every check of the streaming contract on token ids, but the orbax
    round trip of the carry (checked on the per-head layer in test_policies.py)."""
    model = make(SinksWindow(2, 4), key)
    assert_stream_contract(model, tokens(jax.random.fold_in(key, 1)), skip=("checkpoint",))


def test_harness_duo_attention_long_run(key):
    """Per-head split (one full-cache head, one sinks + window head) over a run several times
    the streaming head's cache, first chunk longer than any cache."""
    model = make(duo_attention([True, False], max_cache=24, num_sinks=2, window=3), key)
    assert_stream_contract(model, tokens(jax.random.fold_in(key, 1)), checks=("long",))


@pytest.mark.parametrize("tie", [True, False])
def test_offline_is_a_plain_causal_transformer(tie, key):
    model = make(FullCache(64), key, tie_embeddings=tie)
    x = tokens(jax.random.fold_in(key, 1))
    y = jitted_apply(model, x)
    assert y.values.shape == (3, T, V) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y.mask), np.asarray(x.mask))
    for b, row in enumerate(x.rows()):
        np.testing.assert_allclose(y.rows()[b], numpy_lm(model, row), atol=2e-5, rtol=2e-5)


def test_stacked_params_carry_and_hidden(key):
    model = make(SlidingWindow(5), key)
    assert model.blocks.layers.attn.qkv.kernel[...].shape == (L, D, (H + 2 * HKV) * (D // H))
    carry = model.init_carry(3)
    assert carry.layers.k.shape == (L, 3, 5, HKV, D // H)
    x = tokens(jax.random.fold_in(key, 1))
    h = jax.jit(lambda m, x: m.hidden(x))(model, x)
    np.testing.assert_allclose(model.logits_from_hidden(h.values), jitted_apply(model, x).values,
                               atol=1e-5)
    carry, _ = jitted_step(model, carry, x)
    np.testing.assert_array_equal(np.asarray(model.positions(carry)), [T, 11, 3])


def test_permuting_kv_heads_changes_nothing(key):
    model = make(FullCache(32), key)
    swapped = permute_kv_heads(model, [[1, 0], [0, 1]])
    assert not np.allclose(swapped.blocks.layers.attn.qkv.kernel[...][0],
                           model.blocks.layers.attn.qkv.kernel[...][0])
    x = tokens(jax.random.fold_in(key, 1))
    np.testing.assert_allclose(jitted_apply(swapped, x).values, jitted_apply(model, x).values,
                               atol=1e-5)
    with pytest.raises(ValueError, match="order"):
        permute_kv_heads(model, [[0, 0], [0, 1]])


def test_same_parameters_under_another_policy(key):
    """Train-time FullCache parameters evaluated under sinks + window: identical while the
    kept set is everything (T <= sinks + window + 1), different once tokens are evicted."""
    model = make(FullCache(64), key)
    streaming = with_policy(model, SinksWindow(2, 4))
    assert streaming.attention.ring_sizes == (4,) and model.attention.ring_sizes == (64,)
    x = tokens(jax.random.fold_in(key, 1))
    a, b = (np.asarray(jitted_apply(m, x).values[0]) for m in (model, streaming))
    np.testing.assert_allclose(a[:7], b[:7], atol=1e-5)
    assert np.abs(a[7:] - b[7:]).max() > 1e-3


def test_rollback_of_rejected_draft_tokens(key):
    """Prefill 17 tokens (ring 4 + 3 spare slots wraps), commit a 3-token draft, roll back the
    rejected tail per row: next logits equal a stream that never saw the rejected tokens."""
    model = make(SinksWindow(2, 4), key, max_rollback=3)
    x = tokens(jax.random.fold_in(key, 1), lengths=(20, 20), length=20)
    carry, _ = jitted_step(model, model.init_carry(2), x.time_slice(0, 17))
    drafted, _ = jitted_step(model, carry, x.time_slice(17, 20))
    rolled = jax.jit(lambda m, c, n: m.rollback(c, n))(model, drafted, jnp.array([3, 1]))
    np.testing.assert_array_equal(np.asarray(model.positions(rolled)), [17, 19])
    accepted = x.time_slice(17, 20).replace(mask=jnp.array([[False] * 3, [True, True, False]]))
    direct, _ = jitted_step(model, carry, accepted)
    nxt = tokens(jax.random.fold_in(key, 2), lengths=(2, 2), length=2)
    np.testing.assert_allclose(jitted_step(model, rolled, nxt)[1].values,
                               jitted_step(model, direct, nxt)[1].values, atol=1e-5)


def test_bfloat16(key):
    model = make(SinksWindow(2, 4), key, dtype=jnp.bfloat16)
    ref = make(SinksWindow(2, 4), key)
    x = tokens(jax.random.fold_in(key, 1))
    carry = model.init_carry(3)
    assert carry.layers.k.dtype == jnp.bfloat16 and carry.layers.pos.dtype == jnp.int32
    carry, y = jitted_step(model, carry, x)
    assert y.dtype == jnp.float32 and carry.layers.k.dtype == jnp.bfloat16
    want = jitted_apply(ref, x)
    for got, exp in zip(y.rows(), want.rows()):
        np.testing.assert_allclose(got, exp, atol=0.1, rtol=0.1)


def test_bad_input(key):
    model = make(SlidingWindow(4), key)
    x = tokens(key)
    with pytest.raises(ValueError, match="x: expected integer-kind"):
        model(x.astype(jnp.float32))
    with pytest.raises(ValueError, match="x: expected values of rank 2"):
        model(sz.Seq.full(jnp.zeros((3, T, D), jnp.int32)))
    with pytest.raises(ValueError, match="carry"):
        model.step(make(SlidingWindow(5), key).init_carry(3), x)
    with pytest.raises(ValueError, match="carry"):
        model.step(model.init_carry(2), x)
    spare = make(SlidingWindow(4), key, max_rollback=1)
    with pytest.raises(ValueError, match="count"):
        spare.rollback(spare.init_carry(3), jnp.ones(2, jnp.int32))
    for kwargs, name in [(dict(vocab_size=0), "vocab_size"), (dict(num_layers=0), "num_layers"),
                         (dict(hidden=-1), "hidden"), (dict(num_kv_heads=3), "num_kv_heads"),
                         (dict(policy=None), "policy"), (dict(features=15), "head_dim")]:
        args = dict(vocab_size=V, features=D, num_layers=L, num_heads=H, num_kv_heads=HKV,
                    hidden=HIDDEN, policy=SlidingWindow(4))
        args.update(kwargs)
        with pytest.raises(ValueError, match=name):
            StreamingLM(**args, rngs=nnx.Rngs(0))
