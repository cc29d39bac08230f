"""Tokenizers for the data pipelines: characters and words (speech transcripts), bytes (text).

All three map text to `int32` id arrays and back, reserve id 0 for padding (the CTC blank
for transcripts), and pad batches to `[B, L]` ids plus `[B]` lengths, the form `Seq.from_lengths`
takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PAD = 0  # padding id of every tokenizer here; also the CTC blank of the transcript tokenizers


class _Tokenizer:
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], length: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """`(ids [B, L] int32, lengths [B] int32)`, padded with `PAD` to `length` (default:
        the longest). A text longer than `length` raises instead of being truncated."""
        encoded = [self.encode(t) for t in texts]
        lengths = np.array([len(e) for e in encoded], np.int32)
        longest = int(lengths.max(initial=0))
        if length is None:
            length = longest
        elif length < longest:
            raise ValueError(f"length: expected >= the longest encoded text ({longest} ids), "
                             f"got {length}")
        ids = np.full((len(encoded), length), PAD, np.int32)
        for row, e in enumerate(encoded):
            ids[row, :len(e)] = e
        return ids, lengths


class CharTokenizer(_Tokenizer):
    """One id per character of `alphabet`; 0 is the blank/pad. Transcripts of the speech corpus
    are lowercase words separated by single spaces, which the default alphabet covers."""

    def __init__(self, alphabet: str = " 'abcdefghijklmnopqrstuvwxyz"):
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(f"alphabet: expected distinct characters, got {alphabet!r}")
        self.alphabet = alphabet
        self._ids = {c: i + 1 for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 1

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.array([self._ids[c] for c in text], np.int32)
        except KeyError as err:
            raise ValueError(f"text: expected characters of {self.alphabet!r}, got "
                             f"{err.args[0]!r} in {text!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.alphabet[i - 1] for i in map(int, ids) if i != PAD)


class WordTokenizer(_Tokenizer):
    """One id per vocabulary word: 0 is the blank/pad, 1 the unknown word, then the words in
    the given order. Unknown words map to `UNK` (they cannot occur in the generated corpus)."""

    UNK = 1

    def __init__(self, vocabulary: Sequence[str]):
        words = list(vocabulary)
        if len(set(words)) != len(words) or not words:
            raise ValueError(f"vocabulary: expected distinct words, got {len(words)} words "
                             f"with {len(words) - len(set(words))} duplicates")
        self.words = tuple(words)
        self._ids = {w: i + 2 for i, w in enumerate(words)}
        self.vocab_size = len(words) + 2

    def encode(self, text: str) -> np.ndarray:
        return np.array([self._ids.get(w, self.UNK) for w in text.split()], np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in map(int, ids):
            if i == PAD:
                continue
            out.append("<unk>" if i == self.UNK else self.words[i - 2])
        return " ".join(out)


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes shifted by one (`id = byte + 1`, so 0 stays the pad) plus `EOS = 257`
    marking document boundaries: `vocab_size = 258`. Decoding replaces invalid UTF-8."""

    EOS = 257
    vocab_size = 258

    def encode(self, text: str, add_eos: bool = False) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + 1
        return np.append(ids, np.int32(self.EOS)) if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i - 1 for i in map(int, ids) if 0 < i < self.EOS)
        return data.decode("utf-8", errors="replace")
