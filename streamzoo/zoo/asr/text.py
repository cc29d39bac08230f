"""English characters as tokens, the tokens a streaming decoder emitted, and WER / CER.

Vocabulary (`VOCAB`, 29 tokens): id 0 is the CTC / transducer blank, 1..26 are `a`..`z`,
27 is the apostrophe and 28 the space. `normalize` maps free text onto it (lower case, digits
and most punctuation dropped, hyphens and runs of white space turned into one space), `encode`
and `decode` convert between normalised text and ids, `encode_batch` pads a batch of texts
into `labels [B, U]` int32 plus `lengths [B]` for the losses.

The streaming decoders (`ctc.CTCGreedyDecoder`, `transducer.RNNTGreedyDecoder`) emit, per
input frame, the token ids found at that frame with -1 for "nothing": `emitted_tokens` turns
such a Seq into a compact Seq of tokens (jnp, jit-able) and `token_lists` into Python lists.

Error rates are corpus-level: the sum of Levenshtein distances over the sum of reference
lengths, on words (`word_error_rate`) or on characters, spaces included (`char_error_rate`),
both after `normalize`.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from streamzoo.core.seq import Seq

BLANK = "<blank>"
VOCAB: tuple[str, ...] = (BLANK, *string.ascii_lowercase, "'", " ")
BLANK_ID = 0
VOCAB_SIZE = len(VOCAB)
_ID = {c: i for i, c in enumerate(VOCAB) if i != BLANK_ID}


def normalize(text: str) -> str:
    """Lower case; hyphens/underscores/white space become one space; other characters outside
    the vocabulary are dropped; no leading or trailing space."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    text = re.sub(r"[\s\-_]+", " ", text.lower())
    text = "".join(c for c in text if c in _ID)
    return re.sub(r" +", " ", text).strip()


def encode(text: str) -> np.ndarray:
    """Token ids `[len(text)]` int32 of an already normalised text (see `normalize`)."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    bad = sorted({c for c in text if c not in _ID})
    if bad:
        raise ValueError(
            f"text: expected only characters of the vocabulary (a-z, apostrophe, space), got "
            f"{bad} in {text!r}; call normalize() first")
    return np.array([_ID[c] for c in text], np.int32)


def decode(ids) -> str:
    """The text of token ids (any int sequence); blanks and -1 ("nothing emitted") are skipped."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids: expected integer token ids, got dtype {ids.dtype}")
    bad = ids[(ids < -1) | (ids >= VOCAB_SIZE)]
    if bad.size:
        raise ValueError(f"ids: expected values in [-1, {VOCAB_SIZE}), got {bad[:5].tolist()}")
    return "".join(VOCAB[i] for i in ids.tolist() if i > BLANK_ID)


def encode_batch(texts: Sequence[str], max_length: int | None = None):
    """`(labels [B, U] int32, lengths [B] int32)`: the encoded texts, padded with blank (0).

    U is the longest text, or `max_length` (a ValueError if some text is longer).
    """
    if isinstance(texts, str) or not len(texts):
        raise ValueError("texts: expected a non-empty sequence of str")
    ids = [encode(t) for t in texts]
    longest = max(len(i) for i in ids)
    width = longest if max_length is None else max_length
    if longest > width:
        raise ValueError(f"max_length: expected >= the longest text ({longest}), got {max_length}")
    labels = np.zeros((len(ids), max(width, 1)), np.int32)
    for b, i in enumerate(ids):
        labels[b, :len(i)] = i
    return labels, np.array([len(i) for i in ids], np.int32)


# ------------------------------------------------------------- decoder outputs
def emitted_tokens(y: Seq) -> Seq:
    """The tokens of a decoder output `y` (values `[B, T]` or `[B, T, S]` int, -1 = nothing),
    in order, as a compact Seq `[B, T*S]` whose mask marks the emitted tokens."""
    values = y.values.reshape(y.batch_size, y.length, -1)
    mask = y.mask[:, :, None] & (values >= 0)
    flat = Seq(values.reshape(y.batch_size, -1), mask.reshape(y.batch_size, -1))
    return flat.compacted()


def token_lists(y: Seq) -> list[list[int]]:
    """Per row, the emitted token ids of a decoder output (see `emitted_tokens`)."""
    values, mask = np.asarray(y.values), np.asarray(y.mask)
    values = values.reshape(values.shape[0], values.shape[1], -1)
    return [[int(v) for v in values[b][mask[b]].reshape(-1) if v >= 0]
            for b in range(values.shape[0])]


# --------------------------------------------------------------- error rates
def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    ref, hyp = list(ref), list(hyp)
    row = list(range(len(hyp) + 1))  # distances from ref[:i] to every prefix of hyp
    for i, r in enumerate(ref, start=1):
        prev, row = row, [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (r != h))
    return row[-1]


def _as_list(texts, name: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name}: expected a str or a sequence of str")
    return texts


def _error_rate(refs, hyps, split) -> float:
    refs, hyps = _as_list(refs, "refs"), _as_list(hyps, "hyps")
    if len(refs) != len(hyps):
        raise ValueError(f"hyps: expected {len(refs)} hypotheses (one per reference), got {len(hyps)}")
    errors = total = 0
    for r, h in zip(refs, hyps):
        r, h = split(normalize(r)), split(normalize(h))
        errors += edit_distance(r, h)
        total += len(r)
    if total == 0:
        raise ValueError("refs: expected at least one non-empty reference")
    return errors / total


def word_error_rate(refs, hyps) -> float:
    """Corpus WER: word edits over reference words (a str or sequences of str, normalised)."""
    return _error_rate(refs, hyps, str.split)


def char_error_rate(refs, hyps) -> float:
    """Corpus CER: character edits (spaces included) over reference characters."""
    return _error_rate(refs, hyps, list)


def check_labels(labels, lengths):
    """`labels [B, U]` int32 and `lengths [B]` int32 as jnp arrays, with shape checks."""
    labels, lengths = jnp.asarray(labels), jnp.asarray(lengths)
    if labels.ndim != 2 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels: expected an int array [B, U], got {labels.dtype}{list(labels.shape)}")
    if lengths.shape != labels.shape[:1] or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"label_lengths: expected an int array of shape ({labels.shape[0]},), got "
            f"{lengths.dtype}{list(lengths.shape)}")
    return labels.astype(jnp.int32), lengths.astype(jnp.int32)


def check_blank_id(blank_id, vocab_size: int) -> int:
    """An int in `[0, vocab_size)`, or a ValueError naming `blank_id`."""
    if isinstance(blank_id, bool) or not isinstance(blank_id, int) or not 0 <= blank_id < vocab_size:
        raise ValueError(f"blank_id: expected an int in [0, {vocab_size}), got {blank_id!r}")
    return blank_id
