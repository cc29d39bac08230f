"""The whole codec (audio -> codes -> audio): streaming contract, exactly the input length
(the partial last frame comes out of flush), causality, the training path, bitrates."""

from __future__ import annotations

import jax
import numpy as np

import streamzoo as sz
from streamzoo.core.drivers import jitted_apply
from streamzoo.testing import assert_stream_contract
from tests.zoo.codec.common import LENGTHS, SHALLOW, audio, make_codec


def test_stream_contract(key):
    codec = make_codec(SHALLOW)
    # Skipped: "gradients" (the codes are integers: only the decoder half is differentiable,
    # checked by the decoder's contract run) and "receptive_field" (a perturbed sample changes
    # the output only when it changes a code, so the declared one-frame look-ahead is real but
    # not always observable through the discrete bottleneck; see test_causal below).
    assert_stream_contract(codec, audio(key), num_partitions=2,
                           skip=("gradients", "receptive_field"))


def test_exact_length_and_values(key):
    codec = make_codec()
    x = audio(key)
    y = codec(x)
    np.testing.assert_array_equal(np.asarray(y.lengths()), LENGTHS)  # n samples in, n out
    carry, before = sz.stream(codec, x, [8, 4, 12], with_flush=False)
    np.testing.assert_array_equal(np.asarray(before.lengths()), [24, 16, 4])  # whole frames
    _, tail = codec.flush(carry)
    np.testing.assert_array_equal(np.asarray(tail.lengths()), [0, 1, 3])  # n mod hop
    got = sz.Seq.concatenate([before, tail]).compacted().rows()
    for g, w in zip(got, y.rows()):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    # decode(encode(x)) is the same audio before the cut to each row's length.
    full = codec.decode(codec.encode(x))
    for f, w in zip(full.rows(), y.rows()):
        assert len(f) == -(-len(w) // 4) * 4
        np.testing.assert_allclose(f[:len(w)], w, atol=1e-6)


def test_causal(key):
    """Output samples of frame k never depend on samples of later frames (while the
    continuous latents show that a frame does depend on all of its own samples)."""
    codec = make_codec()
    x = audio(key, lengths=(24,))
    y = np.asarray(jitted_apply(codec, x).values[0, :, 0])
    enc = codec.encoder()
    lat = np.asarray(enc.latents(x).values[0])
    for start in (8, 12, 20):
        changed = x.replace(values=x.values.at[0, start:].add(3.0))
        z = np.asarray(jitted_apply(codec, changed).values[0, :, 0])
        np.testing.assert_array_equal(z[:start], y[:start])  # earlier frames untouched
        last = x.replace(values=x.values.at[0, start + 3].add(3.0))  # frame's last sample
        moved = np.asarray(enc.latents(last).values[0])
        np.testing.assert_array_equal(moved[:start // 4], lat[:start // 4])
        assert not np.allclose(moved[start // 4], lat[start // 4])


def test_training_path_matches_inference(key):
    codec = make_codec()
    x = audio(key)
    out = codec.autoencode(x)  # no rng: no quantizer dropout
    y = codec(x)
    for a, b in zip(out.audio.rows(), y.rows()):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(out.codes.rows(), codec.encode(x).rows()):
        np.testing.assert_array_equal(a, b)
    dropped = codec.autoencode(x, rng=jax.random.fold_in(key, 1))
    n = np.asarray(dropped.num_active)
    assert (n == n[0]).all() and 1 <= n[0] <= 3  # one count per batch
    codes = np.asarray(dropped.codes.values)
    assert (codes[..., n[0]:] == -1).all()
    assert np.isfinite(float(out.commitment_loss)) and float(out.commitment_loss) > 0


def test_lower_bitrate_streams(key):
    codec = make_codec()
    low = codec.with_num_quantizers(1)
    x = audio(key)
    y_low, y_full = low(x), codec(x)
    assert not np.allclose(np.asarray(y_low.values), np.asarray(y_full.values))
    _, streamed = sz.stream(low, x, 8)
    for g, w in zip(streamed.rows(), y_low.rows()):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    # The low-rate codec decodes exactly the first codebook of the full-rate codes.
    first = codec.encode(x).values[..., :1]
    np.testing.assert_array_equal(np.asarray(low.encode(x).values), np.asarray(first))
