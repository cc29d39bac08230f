"""CTC head: projection (streaming contract), CTC loss against brute-force enumeration of
alignments (with and without the delay penalty), the penalty's effect on emission times, and
streaming greedy decoding (contract + a NumPy reference)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.asr import ctc, text

B, T, D, V = 3, 16, 6, 6  # D == V: the head's and the decoder's contracts share shapes


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def brute_force_nll(logits, labels, delay_penalty=0.0, blank=0):
    """-log sum over all V^T paths that collapse to `labels`, each weighted by the delay
    penalty exp(-lambda * sum over onsets of (t - (T-1)/2)); float64."""
    lp = log_softmax64(logits)
    n, vocab = lp.shape
    total = -np.inf
    for path in itertools.product(range(vocab), repeat=n):
        collapsed, prev, offsets = [], blank, 0.0
        for t, c in enumerate(path):
            if c != blank and c != prev:
                collapsed.append(c)
                offsets += t - (n - 1) / 2
            prev = c
        if collapsed == list(labels):
            total = np.logaddexp(total, lp[np.arange(n), path].sum() - delay_penalty * offsets)
    return -total


def greedy_reference(logits_rows, blank=0):
    """Per row: argmax per frame, merge repeats, drop blanks (the textbook best-path decode)."""
    out = []
    for row in logits_rows:
        best = np.argmax(row, axis=-1)
        out.append([int(c) for i, c in enumerate(best) if c != blank and (i == 0 or c != best[i - 1])])
    return out


@pytest.fixture(scope="module")
def tiny_case():
    """Logits [4, 5, 4] with per-row lengths; labels with a repeat (1, 1), an empty row, and a
    row whose labels cannot fit in its 2 frames (1, blank, 1 needs 3)."""
    logits = 1.5 * jax.random.normal(jax.random.key(11), (4, 5, 4))
    frames = jnp.array([5, 4, 3, 2])
    labels = jnp.array([[1, 1, 2], [3, 2, 0], [0, 0, 0], [1, 1, 0]])
    label_lengths = jnp.array([3, 2, 0, 2])
    return logits, frames, labels, label_lengths


# ------------------------------------------------------------------------------- head
def test_head_projection_and_contract(key):
    head = ctc.CTCHead(D, V, rngs=nnx.Rngs(0))
    x = sz.Seq.from_lengths(jax.random.normal(key, (B, T, D)), jnp.array([T, 11, 4]))
    y = sz.jitted_apply(head, x)  # the harness's own jitted offline call
    assert y.values.shape == (B, T, V) and y.dtype == jnp.float32
    want = np.asarray(x.values) @ np.asarray(head.proj.kernel[...]) + np.asarray(head.proj.bias[...])
    for b, row in enumerate(y.rows()):
        np.testing.assert_allclose(row, want[b, :row.shape[0]], atol=1e-5, rtol=1e-5)
    assert_stream_contract(head, x)


def test_head_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        ctc.CTCHead(D, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dtype"):
        ctc.CTCHead(D, V, dtype=jnp.int32, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------- loss
def test_loss_matches_brute_force(tiny_case):
    """Both implementations (optax at penalty 0, ours at 0.4) against enumeration of all paths;
    finite gradients; an infeasible row gets a large finite loss."""
    logits, frames, labels, label_lengths = tiny_case
    mask = sz.Seq.from_lengths(logits, frames).mask
    # NaN in the invalid frames and junk in the padded label slots must not matter.
    poisoned = jnp.where(mask[..., None], logits, jnp.nan)
    pad = jnp.arange(labels.shape[1])[None] >= label_lengths[:, None]
    labels = jnp.where(pad, 2, labels)
    penalties = (0.0, 0.4)

    @jax.jit
    def losses_and_grads(values, labels):
        def loss(v, p):
            out = ctc.ctc_loss(sz.Seq(v, mask), labels, label_lengths, delay_penalty=p)
            return out[:3].sum(), out
        return [jax.grad(loss, has_aux=True)(values, p) for p in penalties]

    for penalty, (grad, loss) in zip(penalties, losses_and_grads(poisoned, labels)):
        for b in range(3):
            want = brute_force_nll(np.asarray(logits[b, :frames[b]]),
                                   np.asarray(labels[b, :label_lengths[b]]).tolist(), penalty)
            np.testing.assert_allclose(loss[b], want, rtol=1e-5, atol=1e-5)
        assert np.isfinite(loss[3]) and loss[3] > 1e4
        grad = np.asarray(grad)
        assert np.isfinite(grad).all() and np.abs(grad[mask]).max() > 0 and not grad[~mask].any()


def test_forward_equals_optax_and_ignores_mask_placement(key):
    k1, k2 = jax.random.split(key)
    Bq, Tq, U = 3, 20, 5
    logits = 2.0 * jax.random.normal(k1, (Bq, Tq, V))
    labels = jax.random.randint(k2, (Bq, U), 1, V).at[0, :2].set(3)  # a repeated label
    label_lengths = jnp.array([5, 3, 1])
    x = sz.Seq.from_lengths(logits, jnp.array([20, 9, 14]))
    # The same valid frames spread with interior invalid (NaN) frames: not compact.
    spread_mask = np.zeros((Bq, 2 * Tq), bool)
    spread_vals = np.full((Bq, 2 * Tq, V), np.nan, np.float32)
    rng = np.random.default_rng(int(jax.random.randint(k1, (), 0, 2**30)))
    for b, row in enumerate(x.rows()):
        slots = np.sort(rng.choice(2 * Tq, size=len(row), replace=False))
        spread_mask[b, slots], spread_vals[b, slots] = True, row
    spread = sz.Seq(jnp.asarray(spread_vals), jnp.asarray(spread_mask))

    @jax.jit
    def losses(x, spread, penalty):
        ref = optax.ctc_loss(x.values, 1.0 - x.mask.astype(jnp.float32), labels,
                             (jnp.arange(U)[None] >= label_lengths[:, None]).astype(jnp.float32))
        return (ref, ctc.ctc_loss(x, labels, label_lengths),
                ctc.ctc_loss(spread, labels, label_lengths),
                ctc.ctc_loss(x, labels, label_lengths, delay_penalty=penalty),  # traced: ours
                ctc.ctc_loss(spread, labels, label_lengths, delay_penalty=penalty))

    ref, plain, plain_spread, ours, ours_spread = losses(x, spread, jnp.float32(0.0))
    np.testing.assert_allclose(plain, ref, rtol=1e-6)
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(plain_spread, plain, rtol=1e-6)
    np.testing.assert_allclose(ours_spread, ours, rtol=1e-6)
    _, _, _, ours, ours_spread = losses(x, spread, jnp.float32(0.3))
    np.testing.assert_allclose(ours_spread, ours, rtol=1e-6)
    assert not np.allclose(ours, plain)


def test_delay_penalty_makes_emissions_earlier(key):
    """Fit free logits to the labels with and without the penalty (same start): the penalised
    fit emits its tokens earlier (greedy onset frames), and both still decode the labels."""
    Tq = 16
    labels, lengths = jnp.array([[1, 2, 3], [2, 4, 1]]), jnp.array([3, 3])
    mask = jnp.ones((2, Tq), bool)
    start = jax.random.normal(key, (2, Tq, 5))
    opt = optax.adam(0.1)

    @jax.jit
    def fit(penalty):
        def loss(v):
            return ctc.ctc_loss(sz.Seq(v, mask), labels, lengths, delay_penalty=penalty).sum()

        def body(carry, _):
            v, state = carry
            updates, state = opt.update(jax.grad(loss)(v), state)
            return (optax.apply_updates(v, updates), state), None

        (v, _), _ = jax.lax.scan(body, (start, opt.init(start)), None, length=150)
        return v

    onsets = {}
    for penalty in (0.0, 0.5):
        y = ctc.CTCGreedyDecoder(5)(sz.Seq(fit(jnp.float32(penalty)), mask))
        assert text.token_lists(y) == [[1, 2, 3], [2, 4, 1]]
        onsets[penalty] = np.nonzero(np.asarray(y.values) >= 0)[1].mean()
    assert onsets[0.5] < onsets[0.0] - 1.0, onsets


def test_loss_errors(tiny_case):
    logits, frames, labels, label_lengths = tiny_case
    x = sz.Seq.from_lengths(logits, frames)
    with pytest.raises(ValueError, match="logits"):
        ctc.ctc_loss(logits, labels, label_lengths)
    with pytest.raises(ValueError, match="labels"):
        ctc.ctc_loss(x, labels[:2], label_lengths[:2])
    with pytest.raises(ValueError, match="label_lengths"):
        ctc.ctc_loss(x, labels, label_lengths[:2])
    with pytest.raises(ValueError, match="blank_id"):
        ctc.ctc_loss(x, labels, label_lengths, blank_id=4)


# --------------------------------------------------------------------- greedy decoding
def peaky_logits(key, batch, length, vocab):
    """Logits whose argmax runs through blanks, repeats and changes (what CTC models emit)."""
    k1, k2, k3 = jax.random.split(key, 3)
    draws = np.asarray(jax.random.randint(k1, (batch, length), 0, vocab))
    repeat = np.asarray(jax.random.bernoulli(k2, 0.5, (batch, length)))
    tokens = draws.copy()
    for t in range(1, length):
        tokens[:, t] = np.where(repeat[:, t], tokens[:, t - 1], draws[:, t])
    return 3.0 * jax.nn.one_hot(tokens, vocab) + jax.random.normal(k3, (batch, length, vocab))


def test_greedy_decoder_matches_reference_and_contract(key):
    logits = peaky_logits(key, B, T, V)
    x = sz.Seq.from_lengths(logits, jnp.array([T, 13, 6]))
    decoder = ctc.CTCGreedyDecoder(V)
    y = sz.jitted_apply(decoder, x)
    assert y.dtype == jnp.int32 and y.values.shape == (B, T)
    assert text.token_lists(y) == greedy_reference(x.rows())
    assert any(len(r) > 1 for r in greedy_reference(x.rows()))
    assert_stream_contract(decoder, x, skip=("gradients",))  # integer outputs: no gradient


def test_greedy_decoder_errors():
    with pytest.raises(ValueError, match="blank_id"):
        ctc.CTCGreedyDecoder(V, blank_id=V)
    decoder = ctc.CTCGreedyDecoder(V)
    with pytest.raises(ValueError, match="feature shape"):
        decoder(sz.Seq.full(jax.random.normal(jax.random.key(0), (1, 4, V + 1))))
