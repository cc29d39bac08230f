"""Streaming perplexity: FullCache streaming equals the offline NLL; recomputation equals an
explicit per-token loop; a one-layer window-only stream equals recomputation (RoPE is
relative); table helpers; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.core import jitted_apply
from streamzoo.layers.kv_policies import FullCache, SinksWindow, SlidingWindow
from streamzoo.zoo.lm.model import StreamingLM, with_policy
from streamzoo.zoo.lm.perplexity import (bucket_edges, bucket_perplexity, heldout_streams,
                                         markdown_table, offline_nll, recompute_nll,
                                         stream_nll, token_nll)

V, D, H, HKV, HIDDEN, N = 32, 16, 4, 2, 32, 41


def make(policy, key, layers=2) -> StreamingLM:
    return StreamingLM(V, D, layers, H, HKV, HIDDEN, policy=policy, rngs=nnx.Rngs(params=key))


@pytest.fixture(scope="module")
def model():
    return make(FullCache(64), jax.random.key(7))


@pytest.fixture(scope="module")
def streams():
    return np.asarray(jax.random.randint(jax.random.key(8), (2, N), 0, V, dtype=jnp.int32))


def test_full_cache_stream_equals_offline(model, streams):
    """Chunked streaming through the cache (chunk 8, last chunk partly masked) equals the
    offline teacher-forced NLL; `token_nll` equals a float64 log-softmax."""
    streamed = stream_nll(model, streams, chunk_size=8)
    offline = offline_nll(model, streams)
    assert streamed.shape == offline.shape == (2, N - 1)
    assert np.isfinite(offline).all() and offline.mean() > 1.0
    np.testing.assert_allclose(streamed, offline, atol=1e-5, rtol=0)
    logits = np.asarray(jax.random.normal(jax.random.key(9), (3, 5, V)) * 4, np.float64)
    targets = np.asarray(jax.random.randint(jax.random.key(10), (3, 5), 0, V))
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    got = token_nll(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep_first", [0, 1])
def test_recompute_equals_explicit_loop(model, streams, keep_first):
    """Token t is predicted by an offline full-causal run over tokens[t-c+1 .. t] at positions
    0.., one call per token (context c = 4; the first windows are shorter, given as end-padded
    [1, c] inputs so that the loop compiles once); with keep_first=1 the stream's first token
    stays in front of every full window."""
    c, n = 4, 11
    tokens = streams[:, :n]
    got = recompute_nll(model, tokens, c, keep_first=keep_first, batch_windows=8)
    full = with_policy(model, FullCache(c))
    want = np.zeros((2, n - 1), np.float32)
    for b in range(2):
        for t in range(n - 1):
            window = tokens[b, max(0, t - c + 1):t + 1]
            if keep_first and t >= c:
                window = np.concatenate([tokens[b, :keep_first], window[keep_first:]])
            x = sz.Seq.from_lengths(jnp.asarray(np.pad(window, (0, c - len(window)))[None]),
                                    jnp.asarray([len(window)]))
            logits = jitted_apply(full, x).values[0, len(window) - 1]
            want[b, t] = float(token_nll(logits, jnp.asarray(tokens[b, t + 1])))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_one_layer_window_stream_equals_recompute(key, streams):
    """With one layer a window-only query sees exactly the recomputed window, and RoPE only
    depends on distances: SlidingWindow(K) streaming == recompute over K + 1 tokens. Sinks +
    window at cache positions differs from both once the first tokens leave the window."""
    k = 6
    one = make(SlidingWindow(k), key, layers=1)
    window = stream_nll(one, streams, chunk_size=8)
    recompute = recompute_nll(one, streams, k + 1, batch_windows=32)
    np.testing.assert_allclose(window, recompute, atol=2e-5, rtol=0)
    sinks = stream_nll(with_policy(one, SinksWindow(2, k - 2)), streams, chunk_size=8)
    np.testing.assert_allclose(sinks[:, :k], window[:, :k], atol=2e-5, rtol=0)
    assert np.abs(sinks[:, k + 2:] - window[:, k + 2:]).max() > 1e-4


def test_table_helpers():
    assert bucket_edges(2047, 128) == [0, 64, 128, 256, 512, 1024, 2047]
    nll = np.log(np.array([[2.0, 2.0, 8.0, 8.0]]))
    np.testing.assert_allclose(bucket_perplexity(nll, [0, 2, 4]), [2.0, 8.0])
    table = markdown_table({"a": {"kept": 3, "nll": nll}}, [0, 2, 4])
    assert "| a | 3 | 4.000 | 2.000 | 2.000 | 8.000 |" in table
    tokens = np.arange(30)
    np.testing.assert_array_equal(heldout_streams(tokens, 3, 10), tokens.reshape(3, 10))
    with_start = heldout_streams(tokens, 3, 10, start_token=99)
    np.testing.assert_array_equal(with_start[:, 0], 99)
    np.testing.assert_array_equal(with_start[:, 1:], tokens[:27].reshape(3, 9))


def test_bad_input(model, streams):
    with pytest.raises(ValueError, match="tokens"):
        stream_nll(model, streams[0])
    with pytest.raises(ValueError, match="tokens"):
        stream_nll(model, streams.astype(np.float32))
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 32\)"):
        offline_nll(model, streams + V)
    with pytest.raises(ValueError, match="chunk_size"):
        stream_nll(model, streams, chunk_size=0)
    with pytest.raises(ValueError, match="context"):
        recompute_nll(model, streams, 0)
    with pytest.raises(ValueError, match="keep_first"):
        recompute_nll(model, streams, 4, keep_first=4)
    with pytest.raises(ValueError, match="rows"):
        heldout_streams(np.arange(30), 4, 10)
