"""LogMel: offline against an independent SciPy/NumPy log-mel (scipy.signal.stft, a Slaney
filter bank written out here), the streaming contract, rows out of phase, fixed normalisation
statistics, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

import streamzoo as sz
from streamzoo.layers.logmel import LogMel, estimate_log_mel_stats
from streamzoo.testing import assert_stream_contract

_offline, _step = sz.jitted_apply, sz.jitted_step


def slaney_filters(sample_rate, n_fft, n_mels):
    """librosa's default mel filters (Slaney scale, area-normalised), `[bins, n_mels]`."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def hz2mel(f):
        f = np.asarray(f, np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz)
                        / logstep, f / f_sp)

    def mel2hz(m):
        m = np.asarray(m, np.float64)
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)),
                        m * f_sp)

    edges = mel2hz(np.linspace(hz2mel(0.0), hz2mel(sample_rate / 2), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    fb = np.zeros((n_mels, freqs.size))
    for m in range(n_mels):
        lo, mid, hi = edges[m:m + 3]
        fb[m] = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
        fb[m] *= 2.0 / (hi - lo)
    return fb.T


def reference(audio, fe: LogMel, floor=1e-6):
    """Causal framing = left-pad window - hop zeros; scipy's STFT of the (pre-emphasised)
    signal; power; mel; log with floor."""
    pad = fe.window - fe.hop
    x = np.concatenate([np.zeros(pad + 1), np.asarray(audio, np.float64)])
    if fe.preemphasis is not None:
        x = x[1:] - fe.preemphasis * x[:-1]
    else:
        x = x[1:]
    _, _, z = scipy.signal.stft(x, nperseg=fe.window, noverlap=fe.window - fe.hop, nfft=fe.n_fft,
                                window="hann", boundary=None, padded=False, detrend=False,
                                scaling="spectrum")
    z = z * scipy.signal.get_window("hann", fe.window).sum()  # undo scipy's 1/sum(window)
    power = np.abs(z.T[:len(audio) // fe.hop]) ** 2
    return np.log(np.maximum(power @ slaney_filters(fe.sample_rate, fe.n_fft, fe.n_mels), floor))


def audio(key, lengths, length, scale=0.1) -> sz.Seq:
    x = jax.random.normal(key, (len(lengths), length, 1)) * scale
    return sz.Seq.from_lengths(x, jnp.array(lengths))


@pytest.mark.parametrize("kwargs", [dict(), dict(preemphasis=0.97),
                                    dict(sample_rate=1600, n_mels=8, preemphasis=0.97)],
                         ids=["16k_80mel", "16k_80mel_preemph", "1600hz_8mel"])
def test_offline_matches_scipy_reference(kwargs, key):
    fe = LogMel(**kwargs)
    assert (fe.window, fe.hop) == (fe.sample_rate // 40, fe.sample_rate // 100)  # 25 / 10 ms
    length = fe.sample_rate // 4
    x = audio(key, (length, length - 37), length)
    got = _offline(fe, x).rows()
    for b, row in enumerate(x.rows()):
        want = reference(row[:, 0], fe)
        assert got[b].shape == want.shape == (row.shape[0] // fe.hop, fe.n_mels)
        np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=1e-4)


TINY = dict(sample_rate=1600, n_mels=8, preemphasis=0.97)  # 40-sample window, 16-sample hop


def test_stream_contract(key):
    fe = LogMel(**TINY)
    x = audio(key, (320, 205, 37), 320)  # a partial hop at the end, a row shorter than a window
    assert_stream_contract(fe, x, skip=("gradients", "checkpoint", "batch", "carry"))


@pytest.mark.slow
def test_stream_contract_all_checks(key):
    fe = LogMel(**TINY, mean=np.linspace(-2, 2, 8), std=np.linspace(1, 3, 8))
    assert_stream_contract(fe, audio(key, (320, 205, 37), 320))


def test_rows_out_of_phase_and_silence(key):
    """Rows at different hop phases in one step (per-row valid counts that are not multiples
    of the hop); a silent row hits the log floor, finitely."""
    fe = LogMel(**TINY)
    values = np.array(jax.random.normal(key, (3, 96, 1))) * 0.1
    values[2] = 0.0
    want = _offline(fe, sz.Seq.full(jnp.asarray(values))).rows()
    carry, got, start = fe.init_carry(3), [], np.zeros(3, int)
    for lengths in [(5, 16, 0), (16, 0, 16), (16, 16, 16), (59, 64, 64)]:  # hop = 16
        chunk, mask = np.zeros((3, 64, 1), np.float32), np.zeros((3, 64), bool)
        for b, n in enumerate(lengths):
            chunk[b, :n] = values[b, start[b]:start[b] + n]
            mask[b, :n] = True
            start[b] += n
        carry, y = _step(fe, carry, sz.Seq(jnp.asarray(chunk), jnp.asarray(mask)))
        got.append(y)
    for b in range(3):
        row = np.concatenate([g.rows()[b] for g in got])
        np.testing.assert_allclose(row, want[b], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(want[2], np.log(1e-6), rtol=1e-6)  # silence -> the log floor


def test_fixed_normalisation(key):
    fe = LogMel(**TINY)
    x = audio(key, (320, 250), 320)
    mean, std = estimate_log_mel_stats(fe, x)
    normed = LogMel(**TINY, mean=mean, std=std)
    raw, got = _offline(fe, x), _offline(normed, x)
    np.testing.assert_allclose(got.values, ((raw.values - mean) / std) * raw.mask[..., None],
                               atol=1e-5)
    frames = np.concatenate(got.rows())
    np.testing.assert_allclose(frames.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(frames.std(0), 1, atol=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(window_ms=25.03), "window_ms"),
    (dict(hop_ms=0), "hop_ms"),
    (dict(hop_ms=30), "hop_ms"),
    (dict(n_fft=256), "n_fft"),
    (dict(n_mels=0), "n_mels"),
    (dict(preemphasis=1.5), "preemphasis"),
    (dict(log_floor=0.0), "log_floor"),
    (dict(mean=np.zeros(80)), "mean, std"),
    (dict(mean=np.zeros(79), std=np.ones(79)), "mean"),
    (dict(mean=np.zeros(80), std=np.zeros(80)), "std"),
    (dict(fmax=9000.0), "fmin, fmax"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogMel(**kwargs)


def test_bad_input(key):
    fe = LogMel(**TINY)
    with pytest.raises(ValueError, match="feature shape"):
        fe(sz.Seq.full(jax.random.normal(key, (2, 64, 2))))
    with pytest.raises(ValueError, match="block_size=16"):
        fe.step(fe.init_carry(2), sz.Seq.full(jax.random.normal(key, (2, 24, 1))))
    with pytest.raises(ValueError, match="floating"):
        fe(sz.Seq.full(jnp.ones((2, 64, 1), jnp.int32)))
    with pytest.raises(ValueError, match="carry"):
        fe.step(fe.init_carry(3), sz.Seq.full(jax.random.normal(key, (2, 32, 1))))
