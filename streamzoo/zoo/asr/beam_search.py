"""CTC prefix beam search, on the host (NumPy / Python floats), frame-synchronous and streaming.

    search = CTCPrefixBeamSearch(beam_size=8)
    state = search.init(batch_size)
    for chunk in chunks:                      # Seq [B, T_chunk, V] logits (or log-probs)
        state = search.step(state, chunk)     # consumes each row's valid frames, in order
        partial = search.best(state)          # per row, the best token list so far
    nbest = search.nbest(state)               # per row, [Hypothesis(tokens, log_prob), ...]

A hypothesis is a label *prefix* (a collapsed token sequence). Per row the state keeps up to
`beam_size` prefixes, each with two log-probabilities summed over all the alignments of the
frames seen so far that collapse to it: `log_pb` (alignments ending in blank) and `log_pnb`
(ending in its last token). One frame with log-probs `lp`:

* the prefix stays itself through a blank, `pb' += (pb + pnb) * p(blank)`, or through a repeat
  of its last token, `pnb' += pnb * p(last)`;
* it grows by a token c, `pnb'(prefix + c) += (pb + pnb) * p(c)`, except when c equals the last
  token: then only `pb * p(c)` (a repeat without a blank in between collapses);
* contributions to the same prefix are summed, then the `beam_size` most probable prefixes
  (`pb + pnb`, ties broken by the token tuple) are kept.

Without pruning (a beam as large as the number of prefixes) every prefix probability is exact:
the sum over all alignments (tested against brute-force enumeration). The state after each
frame is all there is, so streaming over any chunking gives exactly the offline result.
With a `Lexicon`, the search is closed-vocabulary: a prefix may only grow into words of the
lexicon (its last, unfinished word must be the start of one) and the word separator may only
follow a complete word; `nbest(state, final=True)` keeps hypotheses that end on a complete word.
This is the decoding graph of a lexicon without a language model (every word equally likely),
as WFST decoders build it; on closed-vocabulary speech it turns near-miss spellings into the
acoustically most probable real word.

With `beam_size=1` the search keeps the single most probable prefix, which is the greedy
(best path) decoding whenever every frame's top probability exceeds 3/4 (peaky CTC posteriors,
as trained models give); on flat posteriors it can differ from greedy, by finding a prefix
of higher total probability.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from streamzoo.core.seq import Seq

_NEG_INF = -math.inf


def _logaddexp(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    hi, lo = (a, b) if a >= b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # the collapsed label sequence (no blanks)
    log_prob: float          # log of the summed probability of its alignments so far


class Lexicon:
    """The words a lexicon-constrained search may emit, as token sequences (a prefix set).

    Args:
      words: the words, each a sequence of token ids (no separator, no blank).
      separator_id: the token between words (the space).
    """

    def __init__(self, words, separator_id: int):
        if isinstance(separator_id, bool) or not isinstance(separator_id, int) or separator_id < 0:
            raise ValueError(f"separator_id: expected an int >= 0, got {separator_id!r}")
        self.words = {tuple(int(t) for t in w) for w in words}
        if not self.words or () in self.words:
            raise ValueError("words: expected at least one word, none of them empty")
        if any(separator_id in w for w in self.words):
            raise ValueError(f"words: expected no word to contain separator_id {separator_id}")
        self.separator_id = separator_id
        self.starts = {w[:i] for w in self.words for i in range(len(w) + 1)}

    @classmethod
    def from_text(cls, words, encode, separator_id: int) -> "Lexicon":
        """A lexicon of text words, tokenised by `encode(word) -> ids`."""
        return cls([encode(w) for w in words], separator_id)

    def last_word(self, prefix: tuple[int, ...]) -> tuple[int, ...]:
        sep = self.separator_id
        i = len(prefix) - 1
        while i >= 0 and prefix[i] != sep:
            i -= 1
        return prefix[i + 1:]

    def allows(self, prefix: tuple[int, ...], token: int) -> bool:
        """Whether `prefix` (itself allowed) may grow by `token`."""
        word = self.last_word(prefix)
        if token == self.separator_id:
            return word in self.words
        return word + (token,) in self.starts

    def complete(self, prefix: tuple[int, ...]) -> bool:
        """Whether `prefix` ends on a complete word (or is empty)."""
        word = self.last_word(prefix)
        return word in self.words or (not prefix)


@dataclasses.dataclass(frozen=True)
class CTCBeamState:
    """Per row: a dict `prefix -> (log_pb, log_pnb)` and the number of frames consumed."""

    beams: tuple[dict, ...]
    frames: tuple[int, ...]

    @property
    def batch_size(self) -> int:
        return len(self.beams)


class CTCPrefixBeamSearch:
    """Frame-synchronous CTC prefix beam search over per-row streams (module docstring).

    Args:
      beam_size: prefixes kept per row after each frame.
      blank_id: the blank token.
      token_top_k: consider only the k most probable non-blank tokens of each frame as
        extensions (None: all; exactness without pruning needs None).
      lexicon: a `Lexicon` constraining the prefixes to its words (None: any token sequence).
    """

    def __init__(self, beam_size: int, *, blank_id: int = 0, token_top_k: int | None = None,
                 lexicon: Lexicon | None = None):
        for name, value in (("beam_size", beam_size), ("token_top_k", token_top_k)):
            if value is None and name == "token_top_k":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(blank_id, bool) or not isinstance(blank_id, int) or blank_id < 0:
            raise ValueError(f"blank_id: expected an int >= 0, got {blank_id!r}")
        if lexicon is not None and not isinstance(lexicon, Lexicon):
            raise ValueError(f"lexicon: expected a Lexicon or None, got {type(lexicon).__name__}")
        self.beam_size, self.blank_id, self.token_top_k = beam_size, blank_id, token_top_k
        self.lexicon = lexicon

    def init(self, batch_size: int) -> CTCBeamState:
        """A fresh state: per row only the empty prefix, with probability 1 (ending in blank)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        return CTCBeamState(tuple({(): (0.0, _NEG_INF)} for _ in range(batch_size)),
                            (0,) * batch_size)

    def step(self, state: CTCBeamState, logits: Seq) -> CTCBeamState:
        """Consume each row's valid frames of `logits` (Seq `[B, T, V]`), in order."""
        if not isinstance(state, CTCBeamState):
            raise ValueError(f"state: expected a CTCBeamState from init(), got {type(state).__name__}")
        if not isinstance(logits, Seq) or logits.values.ndim != 3:
            got = getattr(getattr(logits, "values", None), "shape", type(logits).__name__)
            raise ValueError(f"logits: expected a Seq of values [B, T, V], got {got}")
        if logits.batch_size != state.batch_size:
            raise ValueError(f"logits: expected batch size {state.batch_size} (the state's), "
                             f"got {logits.batch_size}")
        vocab = logits.values.shape[-1]
        if self.blank_id >= vocab:
            raise ValueError(f"blank_id: expected < the vocabulary size {vocab}, got {self.blank_id}")
        beams, frames = list(state.beams), list(state.frames)
        for b, row in enumerate(logits.rows()):
            row = row.astype(np.float64)
            lp = row - np.logaddexp.reduce(row, axis=-1, keepdims=True) if row.size else row
            for frame in lp:
                beams[b] = self._advance(beams[b], frame)
            frames[b] += len(lp)
        return CTCBeamState(tuple(beams), tuple(frames))

    def nbest(self, state: CTCBeamState, final: bool = False) -> list[list[Hypothesis]]:
        """Per row, the hypotheses in the beam, most probable first. With a lexicon and
        `final` (the stream has ended), those ending inside a word are dropped, unless no
        hypothesis of the row ends on a complete word."""
        out = []
        for beams in state.beams:
            ranked = self._ranked(beams)
            if final and self.lexicon is not None:
                ranked = [h for h in ranked if self.lexicon.complete(h[0])] or ranked
            out.append([Hypothesis(p, lp) for p, lp in ranked])
        return out

    def best(self, state: CTCBeamState, final: bool = False) -> list[list[int]]:
        """Per row, the tokens of the most probable hypothesis (`final`: as in `nbest`)."""
        return [list(row[0].tokens) for row in self.nbest(state, final)]

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _ranked(beams: dict) -> list[tuple[tuple[int, ...], float]]:
        scored = [(p, _logaddexp(pb, pnb)) for p, (pb, pnb) in beams.items()]
        return sorted(scored, key=lambda item: (-item[1], item[0]))

    def _advance(self, beams: dict, lp: np.ndarray) -> dict:
        blank = self.blank_id
        tokens = [c for c in range(lp.shape[0]) if c != blank]
        if self.token_top_k is not None and self.token_top_k < len(tokens):
            order = np.argsort(-lp[tokens], kind="stable")[:self.token_top_k]
            tokens = [tokens[i] for i in order]
        lp = lp.tolist()
        nxt: dict[tuple[int, ...], list[float]] = {}

        def add(prefix, which, value):
            entry = nxt.setdefault(prefix, [_NEG_INF, _NEG_INF])
            entry[which] = _logaddexp(entry[which], value)

        lexicon = self.lexicon
        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            add(prefix, 0, total + lp[blank])
            last = prefix[-1] if prefix else None
            if last is not None:
                add(prefix, 1, pnb + lp[last])
            for c in tokens:
                if lexicon is None or lexicon.allows(prefix, c):
                    add(prefix + (c,), 1, (pb if c == last else total) + lp[c])
        ranked = self._ranked({p: tuple(v) for p, v in nxt.items()})
        kept = [p for p, score in ranked[:self.beam_size] if score > _NEG_INF]
        return {p: tuple(nxt[p]) for p in kept}  # impossible prefixes (e.g. a repeat) dropped


def ctc_beam_search(logits: Seq, beam_size: int, *, blank_id: int = 0,
                    token_top_k: int | None = None,
                    lexicon: Lexicon | None = None) -> list[list[Hypothesis]]:
    """Offline convenience: the n-best lists of `CTCPrefixBeamSearch` over whole sequences."""
    search = CTCPrefixBeamSearch(beam_size, blank_id=blank_id, token_top_k=token_top_k,
                                 lexicon=lexicon)
    return search.nbest(search.step(search.init(logits.batch_size), logits), final=True)
