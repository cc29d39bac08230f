"""Character vocabulary, text normalisation, decoder-output collection and WER / CER."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import streamzoo as sz
from streamzoo.zoo.asr import text


def host_rng(key) -> np.random.Generator:
    return np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))


def random_text(rng, n) -> str:
    chars = list("abcdefghijklmnopqrstuvwxyz' ")
    return "".join(rng.choice(chars, size=n))


def test_vocabulary_layout():
    assert text.VOCAB_SIZE == len(text.VOCAB) == 29
    assert text.VOCAB[text.BLANK_ID] == text.BLANK and text.BLANK_ID == 0
    assert text.VOCAB[1] == "a" and text.VOCAB[26] == "z"
    assert text.VOCAB[27] == "'" and text.VOCAB[28] == " "


def test_normalize():
    assert text.normalize("  Hello,   World-wide! It's 42 o'clock.\n") == \
        "hello world wide it's o'clock"
    assert text.normalize("___") == ""
    with pytest.raises(ValueError, match="text"):
        text.normalize(3)


def test_encode_decode_round_trip(key):
    rng = host_rng(key)
    for n in rng.integers(0, 40, size=6):
        s = random_text(rng, int(n))
        ids = text.encode(s)
        assert ids.dtype == np.int32 and ids.shape == (len(s),)
        assert ids.min(initial=1) >= 1 and ids.max(initial=1) < text.VOCAB_SIZE
        assert text.decode(ids) == s
    # Blanks and "nothing emitted" (-1) are skipped; a jnp array works too.
    ids = text.encode("ab c")
    noisy = np.insert(ids, [0, 1, 3], [0, -1, 0])
    assert text.decode(jnp.asarray(noisy)) == "ab c"


def test_encode_decode_errors():
    with pytest.raises(ValueError, match="text.*normalize"):
        text.encode("Hello")
    with pytest.raises(ValueError, match="ids"):
        text.decode([1, 29])
    with pytest.raises(ValueError, match="ids"):
        text.decode([1, -2])
    with pytest.raises(ValueError, match="ids"):
        text.decode(np.array([1.0, 2.0]))


def test_encode_batch(key):
    rng = host_rng(key)
    texts = [random_text(rng, n) for n in (7, 0, 3)]
    labels, lengths = text.encode_batch(texts)
    assert labels.shape == (3, 7) and labels.dtype == np.int32
    np.testing.assert_array_equal(lengths, [7, 0, 3])
    for row, n, s in zip(labels, lengths, texts):
        assert text.decode(row[:n]) == s
        assert np.all(row[n:] == text.BLANK_ID)
    assert text.encode_batch(texts, max_length=9)[0].shape == (3, 9)
    with pytest.raises(ValueError, match="max_length"):
        text.encode_batch(texts, max_length=5)
    with pytest.raises(ValueError, match="texts"):
        text.encode_batch("abc")


def brute_edit_distance(a, b) -> int:
    @functools.lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_edit_distance_matches_recursion(key):
    rng = host_rng(key)
    assert text.edit_distance("kitten", "sitting") == 3
    assert text.edit_distance([], "abc") == 3 and text.edit_distance("ab", []) == 2
    for _ in range(20):
        a = rng.integers(0, 4, size=rng.integers(0, 9)).tolist()
        b = rng.integers(0, 4, size=rng.integers(0, 9)).tolist()
        assert text.edit_distance(a, b) == brute_edit_distance(tuple(a), tuple(b))


def test_error_rates():
    refs = ["the cat sat", "on the mat"]
    hyps = ["the cat sat down", "on a mat"]
    # Words: 1 insertion + 1 substitution over 6 reference words.
    assert text.word_error_rate(refs, hyps) == pytest.approx(2 / 6)
    # Characters: " down" is 5 insertions; "the" -> "a" is 1 substitution + 2 deletions.
    assert text.char_error_rate(refs, hyps) == pytest.approx(8 / (11 + 10))
    # Normalisation applies to both sides; a single string works.
    assert text.word_error_rate("The  Cat!", "the cat") == 0.0
    with pytest.raises(ValueError, match="hyps"):
        text.word_error_rate(refs, hyps[:1])
    with pytest.raises(ValueError, match="refs"):
        text.char_error_rate([""], [""])


def test_emitted_tokens(key):
    rng = host_rng(key)
    B, T, S = 3, 10, 2
    values = rng.integers(-1, 5, size=(B, T, S)).astype(np.int32)
    values[..., 1] = np.where(values[..., 0] < 0, -1, values[..., 1])  # -1 pads each frame's tail
    mask = rng.random((B, T)) < 0.7
    y = sz.Seq(jnp.asarray(values), jnp.asarray(mask))
    want = [[int(v) for v in values[b][mask[b]].reshape(-1) if v >= 0] for b in range(B)]
    assert text.token_lists(y) == want
    got = jax.jit(text.emitted_tokens)(y)
    assert got.compact and got.values.shape == (B, T * S)
    assert [r.tolist() for r in got.rows()] == want
    # Frame-level outputs [B, T] (the CTC decoder's) work the same way.
    flat = sz.Seq(jnp.asarray(values[..., 0]), jnp.asarray(mask))
    assert [r.tolist() for r in text.emitted_tokens(flat).rows()] == text.token_lists(flat)


def test_check_labels_errors():
    with pytest.raises(ValueError, match="labels"):
        text.check_labels(jnp.ones((2,), jnp.int32), jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="label_lengths"):
        text.check_labels(jnp.ones((2, 3), jnp.int32), jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="blank_id"):
        text.check_blank_id(5, 5)
