"""Short-time Fourier transform and mel helpers (plain jnp functions, for spectral losses).

Framing is causal-friendly: frame j covers samples `j*hop .. j*hop + frame_length - 1`
(no centring), so a frame is final as soon as its last sample has arrived, and a row of n
valid samples has `frame_count(n, frame_length, hop)` complete frames. `center=True` pads
`frame_length // 2` zeros on both sides first (the torch/librosa convention, zeros instead of
reflection so that padding never reads garbage beyond a row's end).

Spectra are computed by framing + window + `jnp.fft.rfft` in float32. The mel filter bank is
the Slaney-style one (librosa's default: Slaney mel scale, area-normalised triangles), or
HTK's scale with `htk=True`; built once in numpy.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _check_signal(x, name="x"):
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected audio of shape [B, T], got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: expected floating samples, got dtype {x.dtype}")
    return x


def hann_window(length: int, periodic: bool = True) -> np.ndarray:
    """Hann window (periodic by default, as used for STFT analysis), float32 numpy."""
    length = _check_int("length", length)
    n = np.arange(length)
    denom = length if periodic else max(length - 1, 1)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / denom)).astype(np.float32)


def frame_count(num_samples, frame_length: int, hop: int, center: bool = False):
    """Complete frames in `num_samples` (int or array) under the framing above."""
    n = num_samples + (2 * (frame_length // 2) if center else 0)
    if isinstance(n, numbers.Integral):
        return max(0, (n - frame_length) // hop + 1)
    return jnp.maximum(0, (n - frame_length) // hop + 1)


def frame_signal(x, frame_length: int, hop: int, center: bool = False) -> jax.Array:
    """`[B, T]` -> `[B, F, frame_length]` overlapping frames (F = complete frames; at least 0)."""
    x = _check_signal(x)
    frame_length, hop = _check_int("frame_length", frame_length), _check_int("hop", hop)
    if center:
        half = frame_length // 2
        x = jnp.pad(x, ((0, 0), (half, half)))
    frames = frame_count(x.shape[1], frame_length, hop)
    if frames == 0:
        return jnp.zeros((x.shape[0], 0, frame_length), x.dtype)
    idx = np.arange(frames)[:, None] * hop + np.arange(frame_length)[None, :]
    return x[:, idx]


def stft(x, n_fft: int, hop: int, *, win_length: int | None = None, window="hann",
         center: bool = False) -> jax.Array:
    """Complex STFT `[B, F, n_fft // 2 + 1]` of `x [B, T]` (float32 math).

    Frames are `win_length` (default n_fft) samples, windowed (`"hann"`, `None` for a
    rectangular window, or an array of win_length), zero-padded to n_fft, then `rfft`.
    """
    n_fft = _check_int("n_fft", n_fft)
    win_length = n_fft if win_length is None else _check_int("win_length", win_length)
    if win_length > n_fft:
        raise ValueError(f"win_length: expected <= n_fft={n_fft}, got {win_length}")
    if isinstance(window, str):
        if window != "hann":
            raise ValueError(f"window: expected 'hann', None or an array, got {window!r}")
        window = hann_window(win_length)
    elif window is None:
        window = np.ones(win_length, np.float32)
    window = jnp.asarray(window, jnp.float32)
    if window.shape != (win_length,):
        raise ValueError(f"window: expected shape ({win_length},), got {window.shape}")
    frames = frame_signal(_check_signal(x).astype(jnp.float32), win_length, hop, center) * window
    if win_length < n_fft:
        frames = jnp.pad(frames, ((0, 0), (0, 0), (0, n_fft - win_length)))
    return jnp.fft.rfft(frames, n=n_fft, axis=-1)


def magnitude(spec: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`|spec|` with a floor inside the square root, so that the gradient is finite at 0."""
    return jnp.sqrt(jnp.maximum(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2, eps))


# ------------------------------------------------------------------------------------- mel
def hz_to_mel(hz, htk: bool = False):
    """Hertz to mel (Slaney's scale: linear below 1 kHz, logarithmic above; or HTK's)."""
    hz = np.asarray(hz, np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(hz >= min_log_hz,
                    min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep,
                    hz / f_sp)


def mel_to_hz(mel, htk: bool = False):
    """Inverse of `hz_to_mel`."""
    mel = np.asarray(mel, np.float64)
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)),
                    f_sp * mel)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, *, fmin: float = 0.0,
                   fmax: float | None = None, htk: bool = False,
                   norm: str | None = "slaney") -> np.ndarray:
    """`[n_fft // 2 + 1, n_mels]` float32 triangular filters (multiply a power or magnitude
    spectrum on the right). `norm="slaney"` scales each triangle to unit area per Hz."""
    sample_rate, n_fft, n_mels = (_check_int("sample_rate", sample_rate),
                                  _check_int("n_fft", n_fft), _check_int("n_mels", n_mels))
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"fmin, fmax: expected 0 <= fmin < fmax <= {sample_rate / 2}, "
                         f"got fmin={fmin}, fmax={fmax}")
    if norm not in ("slaney", None):
        raise ValueError(f"norm: expected 'slaney' or None, got {norm!r}")
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels + 2), htk)
    widths = np.diff(edges)
    ramps = edges[:, None] - freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))  # [n_mels, bins]
    if norm == "slaney":
        weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T.astype(np.float32)


def mel_spectrogram(x, sample_rate: int, n_fft: int, hop: int, n_mels: int, *,
                    win_length: int | None = None, fmin: float = 0.0, fmax: float | None = None,
                    power: float = 1.0, center: bool = False) -> jax.Array:
    """`[B, F, n_mels]` mel spectrogram of `x [B, T]` (magnitude**power, then mel filters)."""
    spec = magnitude(stft(x, n_fft, hop, win_length=win_length, center=center)) ** power
    fb = jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels, fmin=fmin, fmax=fmax))
    return jnp.einsum("bfk,km->bfm", spec, fb, precision=jax.lax.Precision.HIGHEST)
