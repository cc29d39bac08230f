"""RNN-T head: the loss against brute-force enumeration of alignments and its gradient against
finite differences, the model loss under masks, the predictor's streaming contract, and
streaming greedy decoding (contract + a NumPy reference decoder)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.testing import ALL_CHECKS, assert_stream_contract
from streamzoo.zoo.asr import text
from streamzoo.zoo.asr import transducer as tr

B, T, E, V = 3, 12, 6, 5
MAX_SYMBOLS = 3


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def brute_force_nll(logits, labels, frames, blank=0):
    """-log sum over every alignment of `labels` to `frames` frames: choose the frame of each
    label (non-decreasing); at each frame emit its labels, then a blank. float64."""
    lp = log_softmax64(logits)
    total = -np.inf
    for times in itertools.combinations_with_replacement(range(frames), len(labels)):
        score, u = 0.0, 0
        for t in range(frames):
            while u < len(labels) and times[u] == t:
                score += lp[t, u, labels[u]]
                u += 1
            score += lp[t, u, blank]
        total = np.logaddexp(total, score)
    return -total


@jax.jit
def rnnt_loss_jit(logits, labels, frames, label_lengths):
    return tr.rnnt_loss(logits, labels, frames, label_lengths)


def test_loss_matches_brute_force(key):
    k1, k2 = jax.random.split(key)
    logits = 1.5 * jax.random.normal(k1, (4, 4, 4, 4))  # [B, T=4, U+1=4, V=4]
    labels = jax.random.randint(k2, (4, 3), 1, 4).at[0, 1].set(2).at[0, 2].set(2)  # a repeat
    frames = jnp.array([4, 2, 1, 3])
    label_lengths = jnp.array([3, 2, 0, 1])
    got = np.asarray(rnnt_loss_jit(logits, labels, frames, label_lengths))
    for b in range(4):
        want = brute_force_nll(logits[b], np.asarray(labels[b, :label_lengths[b]]).tolist(),
                               int(frames[b]))
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
    # Rows without frames: 0 with no labels, a large finite loss otherwise.
    empty = np.asarray(rnnt_loss_jit(logits, labels, jnp.array([0, 0, 4, 4]),
                                     jnp.array([0, 2, 3, 3])))
    assert empty[0] == 0.0 and empty[1] > 1e4
    for b in (2, 3):  # full lattices of rows 2 and 3
        want = brute_force_nll(logits[b], np.asarray(labels[b]).tolist(), 4)
        np.testing.assert_allclose(empty[b], want, rtol=1e-5, atol=1e-5)


def test_loss_gradient_matches_finite_differences(key):
    """d loss / d logits by jax.grad (float32) vs central differences of the float64 brute force;
    the second row's lattice is smaller, and cells outside it get exactly zero gradient."""
    k1, k2 = jax.random.split(key)
    logits = jax.random.normal(k1, (2, 3, 3, 3))  # [B, T=3, U+1=3, V=3]
    labels = jax.random.randint(k2, (2, 2), 1, 3)
    frames, label_lengths = jnp.array([3, 2]), jnp.array([2, 1])
    grad = np.asarray(jax.jit(jax.grad(lambda v: rnnt_loss_jit(v, labels, frames,
                                                               label_lengths).sum()))(logits))
    base = np.asarray(logits, np.float64)
    eps = 1e-5
    fd = np.zeros_like(base)
    for b in range(2):
        lab, n = np.asarray(labels[b, :label_lengths[b]]).tolist(), int(frames[b])
        for idx in np.ndindex(base.shape[1:]):
            plus, minus = base[b].copy(), base[b].copy()
            plus[idx] += eps
            minus[idx] -= eps
            fd[(b,) + idx] = (brute_force_nll(plus, lab, n) - brute_force_nll(minus, lab, n)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=2e-4, rtol=1e-3)
    assert np.all(grad[1, 2:] == 0) and np.all(grad[1, :, 2:] == 0)


def test_loss_errors(key):
    logits = jax.random.normal(key, (2, 3, 3, 4))
    labels, lengths = jnp.array([[1, 2], [3, 1]]), jnp.array([2, 1])
    with pytest.raises(ValueError, match="logits"):
        tr.rnnt_loss(logits[:, :, :2], labels, jnp.array([3, 3]), lengths)
    with pytest.raises(ValueError, match="frame_lengths"):
        tr.rnnt_loss(logits, labels, jnp.array([3.0, 3.0]), lengths)
    with pytest.raises(ValueError, match="label_lengths"):
        tr.rnnt_loss(logits, labels, jnp.array([3, 3]), lengths[:1])
    with pytest.raises(ValueError, match="blank_id"):
        tr.rnnt_loss(logits, labels, jnp.array([3, 3]), lengths, blank_id=4)


# ------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def model():
    m = tr.Transducer(E, V, embed_dim=4, pred_hidden=7, joint_hidden=8, rngs=nnx.Rngs(3))
    # A blank bias so that frames mix blanks, single tokens and capped runs of tokens.
    m.joint.out.bias[...] = m.joint.out.bias[...].at[0].add(1.0)
    return m


def test_model_loss_under_masks(model, key):
    k1, k2 = jax.random.split(key)
    enc = sz.Seq.from_lengths(jax.random.normal(k1, (B, 10, E)), jnp.array([5, 3, 4]))
    labels, lengths = jax.random.randint(k2, (B, 3), 1, V), jnp.array([3, 1, 2])

    @jax.jit
    def loss_and_grad(m, enc, labels):
        loss, grads = jax.value_and_grad(lambda m: m.loss(enc, labels, lengths).sum())(m)
        return loss, grads, m.lattice_logits(enc, labels, lengths)[1]

    loss, grads, lattice = loss_and_grad(model, enc, labels)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    # It is the RNN-T loss of the model's own lattice (brute force on each row).
    want = [brute_force_nll(lattice[b], np.asarray(labels[b, :lengths[b]]).tolist(), int(n))
            for b, n in enumerate(enc.lengths())]
    np.testing.assert_allclose(loss, np.sum(want), rtol=1e-5)
    # NaN in invalid frames, interior invalid frames and junk label padding change nothing.
    spread_vals = jnp.full((B, 10, E), jnp.nan).at[:, 1::2].set(enc.values[:, :5])
    spread_mask = jnp.zeros((B, 10), bool).at[:, 1::2].set(enc.mask[:, :5])
    junk = jnp.where(jnp.arange(3)[None] < lengths[:, None], labels, 4)
    loss2, grads2, _ = loss_and_grad(model, sz.Seq(spread_vals, spread_mask), junk)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_joint_lattice_formula(model, key):
    k1, k2 = jax.random.split(key)
    enc, pred = jax.random.normal(k1, (2, 3, E)), jax.random.normal(k2, (2, 4, 7))
    j = model.joint
    p = lambda a: np.asarray(a[...], np.float64)
    h = np.tanh((np.asarray(enc) @ p(j.enc_proj.kernel) + p(j.enc_proj.bias))[:, :, None]
                + (np.asarray(pred) @ p(j.pred_proj.kernel))[:, None])
    got = jax.jit(lambda j, e, q: j.lattice(e, q))(j, enc, pred)
    np.testing.assert_allclose(got, h @ p(j.out.kernel) + p(j.out.bias),
                               atol=1e-5, rtol=1e-5)


# The suite's time budget: the default run checks what the heads add to the contract (any
# chunking, masks anywhere, per-row batches), the `slow` run every check. The predictor's carry
# is the LSTM's, fully contract-tested in tests/layers/test_recurrent.py.
PREDICTOR_CHECKS = ("partitions", "exec_mask")
DECODER_CHECKS = ("partitions", "batch", "exec_mask")
ALL_BUT_GRADIENTS = tuple(c for c in ALL_CHECKS if c != "gradients")  # integer outputs


@pytest.mark.parametrize("checks", [pytest.param(PREDICTOR_CHECKS, id="main"),
                                    pytest.param(ALL_CHECKS, id="all", marks=pytest.mark.slow)])
def test_predictor_contract(model, key, checks):
    tokens = sz.Seq.from_lengths(jax.random.randint(key, (B, 10), 0, V), jnp.array([10, 7, 3]))
    y = sz.jitted_apply(model.predictor, tokens)  # the harness's own jitted offline call
    assert y.values.shape == (B, 10, 7) and y.dtype == jnp.float32
    assert_stream_contract(model.predictor, tokens, checks=checks)


# -------------------------------------------------------------------- greedy decoding
def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def reference_greedy(model, enc: sz.Seq, max_symbols: int) -> list[list[list[int]]]:
    """Per row and frame, the tokens emitted: a float64 NumPy decoder that keeps the predictor
    state *after* the last emitted token (the textbook formulation)."""
    p = lambda a: np.asarray(a[...], np.float64)
    pred, joint = model.predictor, model.joint
    emb, wi, bi, wh = (p(pred.embed.embedding), p(pred.lstm.input_proj.kernel),
                       p(pred.lstm.input_proj.bias), p(pred.lstm.recurrent_kernel))

    def advance(h, c, token):
        i, f, g, o = np.split(emb[token] @ wi + bi + h @ wh, 4)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        return sigmoid(o) * np.tanh(c), c

    out = []
    for row in enc.rows():
        h, c = advance(np.zeros(7), np.zeros(7), 0)  # after the start token (the blank)
        frames = []
        for frame in row.astype(np.float64):
            enc_h = frame @ p(joint.enc_proj.kernel) + p(joint.enc_proj.bias)
            emitted = []
            for _ in range(max_symbols):
                logits = np.tanh(enc_h + h @ p(joint.pred_proj.kernel)) @ p(joint.out.kernel) \
                    + p(joint.out.bias)
                k = int(np.argmax(logits))
                if k == 0:
                    break
                emitted.append(k)
                h, c = advance(h, c, k)
            frames.append(emitted)
        out.append(frames)
    return out


def test_greedy_decoder_matches_reference(model, key):
    enc = sz.Seq.from_lengths(jax.random.normal(key, (B, T, E)), jnp.array([T, 9, 4]))
    decoder = tr.RNNTGreedyDecoder(model, max_symbols_per_frame=MAX_SYMBOLS)
    y = sz.jitted_apply(decoder, enc)
    assert y.dtype == jnp.int32 and y.values.shape == (B, T, MAX_SYMBOLS)
    want = reference_greedy(model, enc, MAX_SYMBOLS)
    for b, row in enumerate(want):
        got = [[int(v) for v in frame if v >= 0] for frame in y.rows()[b]]
        assert got == row, (b, got, row)
    counts = [len(f) for row in want for f in row]
    assert 0 in counts and MAX_SYMBOLS in counts  # blank frames and capped frames both occur
    assert text.token_lists(y) == [sum(row, []) for row in want]


@pytest.mark.parametrize("checks", [pytest.param(DECODER_CHECKS, id="main"),
                                    pytest.param(ALL_BUT_GRADIENTS, id="all", marks=pytest.mark.slow)])
def test_greedy_decoder_contract(model, key, checks):
    enc = sz.Seq.from_lengths(jax.random.normal(key, (B, T, E)), jnp.array([T, 9, 4]))
    decoder = tr.RNNTGreedyDecoder(model, max_symbols_per_frame=MAX_SYMBOLS)
    assert_stream_contract(decoder, enc, checks=checks)


def test_model_errors(model, key):
    with pytest.raises(ValueError, match="max_symbols_per_frame"):
        tr.RNNTGreedyDecoder(model, max_symbols_per_frame=0)
    with pytest.raises(ValueError, match="blank_id"):
        tr.Transducer(E, V, blank_id=V, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="enc"):
        model.loss(sz.Seq.full(jax.random.normal(key, (1, 4, E + 1))), jnp.array([[1]]),
                   jnp.array([1]))
    with pytest.raises(ValueError, match="integer"):
        model.predictor(sz.Seq.full(jax.random.normal(key, (1, 4))))
