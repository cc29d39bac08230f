"""Speech segments from a per-chunk speech-probability track, with hysteresis.

A segment opens at the first chunk whose probability is >= `onset`. Inside a segment, a
chunk below `offset` (< onset) starts a silence run; a chunk >= `onset` cancels the run;
chunks in between (the hysteresis band) neither start nor cancel one, so a probability that
wavers around a single threshold does not chop speech into pieces. The segment closes at the
start of a silence run once the run has lasted `min_silence_ms`. Segments shorter than
`min_speech_ms` are dropped; the rest are widened by `pad_ms` on both sides, never past the
ends of the audio, and where two padded segments would overlap the gap is split in the middle.

`SegmentTracker` does this online: `push(probs)` returns the segments that became final
(a closed segment waits until no later segment can claim its padding), `finish()` the rest
at end of stream. `speech_segments(probs)` is the same tracker run over a whole track, so
online and offline segments are identical.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    onset: float = 0.5  # probability that opens (and keeps) speech
    offset: float | None = None  # below it counts as silence; None: onset - 0.15
    min_silence_ms: float = 100.0  # a silence run this long closes a segment
    min_speech_ms: float = 250.0  # shorter segments are dropped
    pad_ms: float = 30.0  # widen each kept segment by this much on both sides
    sample_rate: int = 16_000
    chunk_size: int = 512  # samples per probability

    def __post_init__(self):
        if not 0.0 < self.onset <= 1.0:
            raise ValueError(f"onset: expected in (0, 1], got {self.onset}")
        if not 0.0 <= self.resolved_offset <= self.onset:
            raise ValueError(f"offset: expected in [0, onset={self.onset}], got {self.offset}")
        for name in ("min_silence_ms", "min_speech_ms", "pad_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("sample_rate", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")

    @property
    def resolved_offset(self) -> float:
        return max(self.onset - 0.15, 0.0) if self.offset is None else self.offset

    def samples(self, ms: float) -> int:
        return int(round(ms * self.sample_rate / 1000.0))


@dataclasses.dataclass(frozen=True)
class Segment:
    """Speech in samples `[start, end)` of the audio."""

    start: int
    end: int

    def seconds(self, sample_rate: int = 16_000) -> tuple[float, float]:
        return self.start / sample_rate, self.end / sample_rate


class SegmentTracker:
    """Online hysteresis segmentation of a probability track (see the module docstring)."""

    def __init__(self, config: SegmentConfig = SegmentConfig()):
        if not isinstance(config, SegmentConfig):
            raise ValueError(f"config: expected a SegmentConfig, got {type(config).__name__}")
        self.config = config
        self.chunks = 0  # probabilities consumed
        self._start: int | None = None  # open segment's first chunk
        self._silence: int | None = None  # first chunk of the open segment's silence run
        self._closed: tuple[int, int] | None = None  # kept segment (samples) awaiting padding
        self._floor = 0  # padded starts may not precede this sample (the previous padded end)
        self._finished = False

    def push(self, probs) -> list[Segment]:
        """Consume the next probabilities (1-D); returns the segments that became final."""
        if self._finished:
            raise ValueError("probs: the tracker has finished; make a new SegmentTracker")
        probs = np.asarray(probs, np.float64)
        if probs.ndim != 1:
            raise ValueError(f"probs: expected a 1-D probability track, got shape {probs.shape}")
        if probs.size and not np.all(np.isfinite(probs)):
            raise ValueError("probs: expected finite probabilities, got NaN or inf")
        cfg, out = self.config, []
        onset, offset = cfg.onset, cfg.resolved_offset
        min_silence = max(1, -(-cfg.samples(cfg.min_silence_ms) // cfg.chunk_size))
        for p in probs:
            i = self.chunks
            self.chunks += 1
            if self._start is None:
                if p >= onset:
                    self._start, self._silence = i, None
                    out += self._release(next_start=i * cfg.chunk_size)
            else:
                if p >= onset:
                    self._silence = None
                elif p < offset and self._silence is None:
                    self._silence = i
                if self._silence is not None and self.chunks - self._silence >= min_silence:
                    self._close(self._silence)
            out += self._release(next_start=None)
        return out

    def finish(self) -> list[Segment]:
        """End of stream: close the open segment and release everything held back."""
        if self._finished:
            return []
        self._finished = True
        if self._start is not None:
            self._close(self._silence if self._silence is not None else self.chunks)
        return self._release(next_start=None, final=True)

    # ------------------------------------------------------------------ internals
    def _close(self, end_chunk: int):
        cfg = self.config
        start, end = self._start * cfg.chunk_size, end_chunk * cfg.chunk_size
        self._start = self._silence = None
        if end - start >= cfg.samples(cfg.min_speech_ms):
            self._closed = (start, end)

    def _release(self, next_start: int | None, final: bool = False) -> list[Segment]:
        """Emit the closed segment once its end padding is settled."""
        if self._closed is None:
            return []
        cfg = self.config
        pad = cfg.samples(cfg.pad_ms)
        start, end = self._closed
        now = self.chunks * cfg.chunk_size
        if next_start is not None:
            end_pad = min(pad, (next_start - end) // 2)
        elif final:
            end_pad = min(pad, now - end)
        elif now - end >= 2 * pad:  # no later segment can reach back into this one's padding
            end_pad = pad
        else:
            return []
        segment = Segment(max(start - pad, self._floor), end + end_pad)
        self._closed, self._floor = None, segment.end
        return [segment]


def speech_segments(probs, config: SegmentConfig = SegmentConfig()) -> list[Segment]:
    """All speech segments of a whole probability track (1-D, one value per chunk)."""
    tracker = SegmentTracker(config)
    return tracker.push(probs) + tracker.finish()
