"""Streaming log-mel front-end: audio `[B, S, 1]` -> log-mel frames `[B, S // hop, n_mels]`.

Framing is causal: frame j covers the `window` samples that END at sample `(j+1)*hop - 1`
(samples before the stream start are zeros, i.e. the signal is left-padded with
`window - hop` zeros). So a frame is final as soon as its last hop of samples has arrived:
no look-ahead, no latency, and after n samples exactly `n // hop` frames exist (a partial hop
at the end gives no frame, as a strided conv's partial block gives no output).

Per frame: optional pre-emphasis `y[t] = x[t] - a * x[t-1]` (x[-1] = 0), a Hann window
(periodic), a zero-padded `n_fft` real FFT, the power spectrum, a mel filter bank
(`streamzoo.layers.stft.mel_filterbank`: Slaney scale and area-normalised triangles by
default, librosa's convention), `log(max(mel, log_floor))`, and optionally a FIXED
normalisation `(log_mel - mean) / std` with per-bin statistics estimated once over a corpus
(`estimate_log_mel_stats`). Per-utterance normalisation is deliberately absent: it needs the
whole utterance and cannot stream.

Streaming keeps each row's last `window` samples and its phase (committed samples mod hop),
gathers the windows that end inside the new chunk (per-row offsets, as `Conv1D` does) and runs
the same computation as offline, so the two agree to float rounding for any chunking.
"""

from __future__ import annotations

import functools
import numbers
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from streamzoo.core.frames import take_frames
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.stft import hann_window, mel_filterbank


@functools.lru_cache(maxsize=32)
def _filters(sample_rate, n_fft, n_mels, fmin, fmax, htk, norm) -> np.ndarray:
    """The mel filter bank as a numpy constant (built once per configuration)."""
    fb = mel_filterbank(sample_rate, n_fft, n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=norm)
    fb.setflags(write=False)
    return fb


class MelStat(nnx.Variable):
    """A fixed (non-trained) normalisation statistic: saved with the model, never optimised."""


@struct.dataclass
class LogMelCarry:
    history: jax.Array  # [B, window] the row's last `window` committed samples, oldest first
    phase: jax.Array  # [B] int32 committed samples mod hop


def _samples(name, ms, sample_rate) -> int:
    if not isinstance(ms, numbers.Real) or ms <= 0:
        raise ValueError(f"{name}: expected a positive number of milliseconds, got {ms!r}")
    exact = Fraction(ms).limit_denominator(10**6) * sample_rate / 1000
    if exact.denominator != 1:
        raise ValueError(
            f"{name}: {ms} ms at sample_rate={sample_rate} is {float(exact):g} samples; "
            "expected a whole number of samples")
    return int(exact)


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class LogMel(StreamLayer):
    """Causal log-mel spectrogram (see module docstring): `[B, S, 1]` -> `[B, S // hop, n_mels]`.

    Defaults are the usual ASR front-end: 16 kHz, 25 ms Hann window, 10 ms hop, 512-point FFT,
    80 mel bins over 0..8 kHz, power spectrum, log floor 1e-6 (about -13.8), no pre-emphasis,
    no normalisation. `mean`/`std` (each `[n_mels]`) turn on fixed normalisation. Math runs
    in float32 whatever the input dtype; the output is cast to `dtype` (default: the input's).
    """

    def __init__(self, *, sample_rate: int = 16000, n_mels: int = 80, window_ms: float = 25.0,
                 hop_ms: float = 10.0, n_fft: int | None = None, fmin: float = 0.0,
                 fmax: float | None = None, htk: bool = False, mel_norm: str | None = "slaney",
                 preemphasis: float | None = None, log_floor: float = 1e-6, mean=None, std=None,
                 dtype=None):
        self.sample_rate = _positive_int("sample_rate", sample_rate)
        self.n_mels = _positive_int("n_mels", n_mels)
        self.window = _samples("window_ms", window_ms, self.sample_rate)
        self.hop = _samples("hop_ms", hop_ms, self.sample_rate)
        if self.hop > self.window:
            raise ValueError(f"hop_ms: expected a hop ({self.hop} samples) no longer than the "
                             f"window ({self.window} samples), got hop_ms={hop_ms}")
        self.n_fft = (1 << (self.window - 1).bit_length()) if n_fft is None else \
            _positive_int("n_fft", n_fft)
        if self.n_fft < self.window:
            raise ValueError(f"n_fft: expected >= the window length {self.window}, got {n_fft}")
        if preemphasis is not None and not (isinstance(preemphasis, numbers.Real)
                                            and 0.0 <= preemphasis < 1.0):
            raise ValueError(f"preemphasis: expected None or a number in [0, 1), got {preemphasis!r}")
        if not (isinstance(log_floor, numbers.Real) and log_floor > 0):
            raise ValueError(f"log_floor: expected a positive number, got {log_floor!r}")
        self.preemphasis = None if preemphasis is None else float(preemphasis)
        self.log_floor = float(log_floor)
        self.in_features = 1
        self.out_features = self.n_mels
        self.dtype = dtype
        self.mel_args = (float(fmin), None if fmax is None else float(fmax), bool(htk), mel_norm)
        _filters(self.sample_rate, self.n_fft, self.n_mels, *self.mel_args)  # argument checks
        if (mean is None) != (std is None):
            raise ValueError("mean, std: expected both or neither, got "
                             f"mean={'set' if mean is not None else None}, "
                             f"std={'set' if std is not None else None}")
        if mean is None:
            self.mean = self.std = None
        else:
            mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
            for name, a in (("mean", mean), ("std", std)):
                if a.shape != (self.n_mels,):
                    raise ValueError(f"{name}: expected shape ({self.n_mels},), got {a.shape}")
            if not np.all(std > 0):
                raise ValueError(f"std: expected positive values, got min {std.min()}")
            self.mean = MelStat(jnp.asarray(mean))
            self.std = MelStat(jnp.asarray(std))

    # ------------------------------------------------------------------ facts
    @property
    def spec(self) -> StreamSpec:
        reach = self.window - 1 + (1 if self.preemphasis is not None else 0)
        return StreamSpec(block_size=self.hop, output_ratio=Fraction(1, self.hop),
                          receptive_field=(-float(reach), 0.0))

    @property
    def frame_rate(self) -> float:
        """Output frames per second."""
        return self.sample_rate / self.hop

    def num_frames(self, num_samples):
        """Frames for `num_samples` samples (int or array): `num_samples // hop`."""
        return num_samples // self.hop

    # ---------------------------------------------------------------- compute
    def log_mel(self, frames: jax.Array) -> jax.Array:
        """`[..., window (+1 with pre-emphasis)]` raw samples -> `[..., n_mels]` float32."""
        frames = frames.astype(jnp.float32)
        if self.preemphasis is not None:
            frames = frames[..., 1:] - self.preemphasis * frames[..., :-1]
        spec = jnp.fft.rfft(frames * hann_window(self.window), n=self.n_fft, axis=-1)
        power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
        filters = _filters(self.sample_rate, self.n_fft, self.n_mels, *self.mel_args)
        mel = jnp.einsum("...k,km->...m", power, filters, precision=jax.lax.Precision.HIGHEST)
        out = jnp.log(jnp.maximum(mel, self.log_floor))
        if self.mean is not None:
            out = (out - self.mean[...]) / self.std[...]
        return out

    def _frames(self, buf: jax.Array, start: jax.Array, slots: int) -> jax.Array:
        """Per row, `slots` windows from `buf [B, W + T]`: window m ends at buf index
        `start + window + m*hop` (its first sample is `start + 1 + m*hop`); with pre-emphasis
        each window carries the one sample before it too."""
        extra = 1 if self.preemphasis is not None else 0
        span = self.window + extra
        first = start + 1 - extra
        aligned = take_frames(buf[..., None], first, span + (slots - 1) * self.hop)[..., 0]
        idx = np.arange(slots)[:, None] * self.hop + np.arange(span)[None, :]
        return aligned[:, idx]  # [B, slots, span]

    def _run(self, history, phase, x: Seq):
        """The frames due in `x` (compact) after a row state `(history, phase)`."""
        dtype = self.dtype or x.dtype
        slots = x.length // self.hop
        if slots == 0:
            return Seq.empty(x.batch_size, (self.n_mels,), dtype), None
        lengths = x.lengths()
        buf = jnp.concatenate([history.astype(jnp.float32),
                               x.values[..., 0].astype(jnp.float32)], axis=1)
        # The first window of the chunk ends at chunk sample hop - 1 - phase (buf index
        # window + hop - 1 - phase), so it starts at buf index hop - phase.
        start = self.hop - 1 - phase
        y = self.log_mel(self._frames(buf, start, slots)).astype(dtype)
        count = (phase + lengths) // self.hop
        out = Seq(y, jnp.arange(slots)[None, :] < count[:, None], compact=True).masked()
        new_history = take_frames(buf[..., None], lengths, self.window)[..., 0]
        return out, new_history

    def _forward(self, x: Seq) -> Seq:
        batch = x.batch_size
        history = jnp.zeros((batch, self.window), jnp.float32)
        out, _ = self._run(history, jnp.zeros((batch,), jnp.int32), x)
        return out

    def _init_carry(self, batch_size, dtype):
        return LogMelCarry(jnp.zeros((batch_size, self.window), jnp.float32),
                           jnp.zeros((batch_size,), jnp.int32))

    def _step(self, carry: LogMelCarry, x: Seq):
        out, history = self._run(carry.history, carry.phase, x)
        if history is None:
            return carry, out
        phase = jnp.mod(carry.phase + x.lengths(), self.hop)
        return LogMelCarry(history.astype(carry.history.dtype), phase), out


def estimate_log_mel_stats(frontend: LogMel, audio: Seq) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and std of `frontend`'s un-normalised log-mel over the valid frames of
    `audio [B, S, 1]` (a corpus sample), for `LogMel(mean=..., std=...)`."""
    if frontend.mean is not None:
        raise ValueError("frontend: expected a LogMel without normalisation (mean=None), got "
                         "one with fixed statistics")
    feats = jax.jit(lambda m, a: m(a))(frontend, audio)
    rows = np.concatenate(feats.rows(), axis=0).astype(np.float64)
    if rows.shape[0] < 2:
        raise ValueError(f"audio: expected at least 2 valid frames, got {rows.shape[0]}")
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


__all__ = ["LogMel", "LogMelCarry", "MelStat", "estimate_log_mel_stats"]
