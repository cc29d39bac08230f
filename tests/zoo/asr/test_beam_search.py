"""CTC prefix beam search: exact prefix probabilities against brute-force enumeration of all
alignments, streaming over ragged chunkings, beam 1 vs greedy decoding, and errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import streamzoo as sz
from streamzoo.zoo.asr import ctc, text
from streamzoo.zoo.asr.beam_search import CTCPrefixBeamSearch, Lexicon, ctc_beam_search


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def prefix_log_probs(logits, blank=0) -> dict:
    """Every label sequence's log-probability: a sum over all V^T alignments (float64)."""
    lp = log_softmax64(logits)
    n, vocab = lp.shape
    out: dict = {}
    for path in itertools.product(range(vocab), repeat=n):
        collapsed = tuple(c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1]))
        out[collapsed] = np.logaddexp(out.get(collapsed, -np.inf), lp[np.arange(n), path].sum())
    return out


@pytest.mark.parametrize("frames,vocab", [(4, 3), (5, 4)])
def test_unpruned_beam_is_exact(frames, vocab, key):
    logits = 1.5 * jax.random.normal(key, (2, frames, vocab))
    nbest = ctc_beam_search(sz.Seq.full(logits), beam_size=10_000)
    for b in range(2):
        exact = prefix_log_probs(logits[b])
        assert len(nbest[b]) == len(exact)
        for hyp in nbest[b]:
            assert hyp.log_prob == pytest.approx(exact[hyp.tokens], abs=1e-9)
        best = max(exact, key=exact.get)
        assert nbest[b][0].tokens == best
        assert [h.log_prob for h in nbest[b]] == sorted((h.log_prob for h in nbest[b]), reverse=True)


def test_pruned_beam_finds_the_best_prefix(key):
    logits = 2.0 * jax.random.normal(key, (3, 5, 4))
    search = CTCPrefixBeamSearch(beam_size=4)
    got = search.best(search.step(search.init(3), sz.Seq.full(logits)))
    for b in range(3):
        exact = prefix_log_probs(logits[b])
        assert tuple(got[b]) == max(exact, key=exact.get)


def test_streaming_equals_offline_on_any_chunking(key):
    """Ragged chunkings, per-row lengths and interior invalid (NaN) frames: identical n-best."""
    k1, k2 = jax.random.split(key)
    B, T, V = 3, 24, 5
    logits = 2.0 * jax.random.normal(k1, (B, T, V))
    x = sz.Seq.from_lengths(logits, jnp.array([24, 17, 6]))
    search = CTCPrefixBeamSearch(beam_size=3)
    offline = search.nbest(search.step(search.init(B), x))
    rng = np.random.default_rng(int(jax.random.randint(k2, (), 0, 2**30)))
    # Spread each row's valid frames over 2T slots with NaN in between.
    values = np.full((B, 2 * T, V), np.nan, np.float32)
    mask = np.zeros((B, 2 * T), bool)
    for b, row in enumerate(x.rows()):
        slots = np.sort(rng.choice(2 * T, size=len(row), replace=False))
        values[b, slots], mask[b, slots] = row, True
    spread = sz.Seq(jnp.asarray(values), jnp.asarray(mask))
    for _ in range(4):
        cuts = np.sort(rng.choice(np.arange(1, 2 * T), size=rng.integers(1, 8), replace=False))
        state = search.init(B)
        for start, stop in zip([0, *cuts], [*cuts, 2 * T]):
            state = search.step(state, spread.time_slice(int(start), int(stop)))
            assert all(isinstance(r, list) for r in search.best(state))  # partial results
        assert search.nbest(state) == offline
        assert state.frames == (24, 17, 6)


def peaky_logits(key, batch, length, vocab, top=0.8):
    """Posteriors whose top probability is >= `top` on every frame (argmax runs through blanks,
    repeats and changes)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    draws = np.asarray(jax.random.randint(k1, (batch, length), 0, vocab))
    repeat = np.asarray(jax.random.bernoulli(k2, 0.4, (batch, length)))
    tokens = draws.copy()
    for t in range(1, length):
        tokens[:, t] = np.where(repeat[:, t], tokens[:, t - 1], draws[:, t])
    peak = top + (1 - top) * np.asarray(jax.random.uniform(k3, (batch, length)))
    rest = np.asarray(jax.random.uniform(k4, (batch, length, vocab - 1), minval=0.1))
    rest = rest / rest.sum(axis=-1, keepdims=True)
    probs = np.zeros((batch, length, vocab))
    for b, t in np.ndindex(batch, length):
        others = [c for c in range(vocab) if c != tokens[b, t]]
        probs[b, t, others] = (1 - peak[b, t]) * rest[b, t]
        probs[b, t, tokens[b, t]] = peak[b, t]
    return jnp.asarray(np.log(probs), jnp.float32)


def test_beam_one_equals_greedy_on_peaky_posteriors(key):
    logits = peaky_logits(key, 3, 32, 5)
    x = sz.Seq.from_lengths(logits, jnp.array([32, 20, 9]))
    greedy = text.token_lists(ctc.CTCGreedyDecoder(5)(x))
    assert any(len(g) > 3 for g in greedy)
    search = CTCPrefixBeamSearch(beam_size=1)
    assert search.best(search.step(search.init(3), x)) == greedy


def test_beam_one_can_beat_greedy_on_flat_posteriors():
    """Frame 0 says token 1 (0.9); frame 1 is flat (blank 0.3, token 1 0.3, token 2 0.4).
    Greedy gives [1, 2] (probability 0.36); the prefix [1] has 0.27 + 0.27 + 0.015 = 0.555."""
    probs = np.array([[[0.05, 0.9, 0.05], [0.3, 0.3, 0.4]]])
    x = sz.Seq.full(jnp.asarray(np.log(probs), jnp.float32))
    assert text.token_lists(ctc.CTCGreedyDecoder(3)(x)) == [[1, 2]]
    hyp = ctc_beam_search(x, beam_size=1)[0][0]
    assert hyp.tokens == (1,) and np.exp(hyp.log_prob) == pytest.approx(0.54, abs=1e-6)
    exact = prefix_log_probs(np.log(probs[0]))
    assert np.exp(exact[(1,)]) == pytest.approx(0.555) and np.exp(exact[(1, 2)]) == pytest.approx(0.36)


def test_token_top_k_and_blank_id(key):
    logits = 2.0 * jax.random.normal(key, (2, 6, 4))
    x = sz.Seq.full(logits)
    full = ctc_beam_search(x, beam_size=3)
    assert ctc_beam_search(x, beam_size=3, token_top_k=3) == full  # all 3 non-blank tokens
    # The blank moved to the last id (new id i = old id i + 1): the same hypotheses, renamed.
    moved = ctc_beam_search(sz.Seq.full(logits[..., jnp.array([1, 2, 3, 0])]), beam_size=3,
                            blank_id=3)
    for a, b in zip(full, moved):
        assert [h.tokens for h in b] == [tuple(t - 1 for t in h.tokens) for h in a]
        np.testing.assert_allclose([h.log_prob for h in b], [h.log_prob for h in a], rtol=1e-12)


def test_errors(key):
    with pytest.raises(ValueError, match="beam_size"):
        CTCPrefixBeamSearch(0)
    with pytest.raises(ValueError, match="token_top_k"):
        CTCPrefixBeamSearch(2, token_top_k=0)
    search = CTCPrefixBeamSearch(2, blank_id=5)
    state = search.init(2)
    logits = jax.random.normal(key, (2, 3, 4))
    with pytest.raises(ValueError, match="blank_id"):
        search.step(state, sz.Seq.full(logits))
    with pytest.raises(ValueError, match="batch size"):
        CTCPrefixBeamSearch(2).step(state, sz.Seq.full(logits[:1]))
    with pytest.raises(ValueError, match="logits"):
        CTCPrefixBeamSearch(2).step(state, logits)
    with pytest.raises(ValueError, match="state"):
        CTCPrefixBeamSearch(2).step({}, sz.Seq.full(logits))


def _is_word_sequence(tokens, words, sep) -> bool:
    parts = tuple(tokens)
    if not parts:
        return True
    split, cur = [], []
    for t in parts:
        if t == sep:
            split.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    split.append(tuple(cur))
    return all(w in words for w in split)


def test_lexicon_beam_is_exact_over_word_sequences(key):
    """Unpruned, the lexicon search scores exactly the label sequences made of lexicon words,
    and its best is the most probable such sequence (brute force over all alignments)."""
    words, sep = {(1,), (1, 2), (2, 2)}, 3
    lexicon = Lexicon(words, separator_id=sep)
    logits = 1.5 * jax.random.normal(key, (2, 5, 4))
    nbest = ctc_beam_search(sz.Seq.full(logits), beam_size=10_000, lexicon=lexicon)
    for b in range(2):
        exact = {p: v for p, v in prefix_log_probs(logits[b]).items()
                 if _is_word_sequence(p, words, sep)}
        assert nbest[b][0].tokens == max(exact, key=exact.get)
        for hyp in nbest[b]:
            if hyp.tokens in exact:  # complete word sequences carry their exact probability
                assert hyp.log_prob == pytest.approx(exact[hyp.tokens], abs=1e-9)
            assert lexicon.complete(hyp.tokens)


def test_lexicon_turns_a_misspelling_into_the_nearest_word():
    """Greedy reads `c a t s` where the lexicon only has `c a t` and `b a t s`: the constrained
    search finds the word sequence the posteriors support best."""
    ids = {c: i + 1 for i, c in enumerate("abcst")}
    sep = 6
    lexicon = Lexicon.from_text(["cat", "bats"], lambda w: [ids[c] for c in w], sep)
    frames = [ids[c] for c in "cats"]
    logits = np.full((1, len(frames), 7), -4.0, np.float32)
    for t, c in enumerate(frames):
        logits[0, t, c] = 2.0
    logits[0, 0, ids["b"]] = 1.5  # "b" is the runner-up of the first frame
    free = ctc_beam_search(sz.Seq.full(jnp.asarray(logits)), beam_size=8)
    assert free[0][0].tokens == tuple(frames)  # unconstrained: the misspelling
    got = ctc_beam_search(sz.Seq.full(jnp.asarray(logits)), beam_size=8, lexicon=lexicon)
    assert got[0][0].tokens == tuple(ids[c] for c in "bats")


def test_lexicon_streaming_equals_offline(key):
    words, sep = [(1,), (1, 2), (2, 2), (2, 1, 1)], 3
    lexicon = Lexicon(words, separator_id=sep)
    logits = jax.random.normal(key, (2, 12, 4))
    search = CTCPrefixBeamSearch(beam_size=4, lexicon=lexicon)
    offline = search.nbest(search.step(search.init(2), sz.Seq.full(logits)), final=True)
    state = search.init(2)
    for lo, hi in [(0, 1), (1, 6), (6, 12)]:
        state = search.step(state, sz.Seq.full(logits[:, lo:hi]))
    assert search.nbest(state, final=True) == offline


def test_lexicon_errors():
    with pytest.raises(ValueError, match="separator_id"):
        Lexicon([(1,)], separator_id=-1)
    with pytest.raises(ValueError, match="words"):
        Lexicon([(1, 3)], separator_id=3)
    with pytest.raises(ValueError, match="words"):
        Lexicon([], separator_id=3)
    with pytest.raises(ValueError, match="lexicon"):
        CTCPrefixBeamSearch(2, lexicon={"cat"})
