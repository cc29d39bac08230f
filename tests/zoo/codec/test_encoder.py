"""Codec encoder (audio -> codes): the streaming contract (codes identical to offline, the
partial last frame emitted by flush), lengths, bitrate selection, configs, bad input."""

from __future__ import annotations

from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.codec import Codec, CodecConfig
from tests.zoo.codec.common import LENGTHS, TINY, audio, make_codec


def test_stream_contract(key):
    enc = make_codec().encoder()
    x = audio(key)
    spec = enc.spec
    assert spec.block_size == 4 and spec.output_ratio == Fraction(1, 4)
    assert [spec.offline_length(n) for n in LENGTHS] == [6, 5, 2]  # ceil(n / hop)
    assert [spec.outputs_after(n) for n in LENGTHS] == [6, 4, 1]   # whole frames before flush
    assert_stream_contract(enc, x, num_partitions=1, checks=("partitions", "flush", "batch"))


@pytest.mark.slow  # ~50 CPU-s; the default run checks partitions, flush and batch above
def test_full_stream_contract(key):
    assert_stream_contract(make_codec().encoder(), audio(key), num_partitions=2)


def test_codes_offline_and_streamed(key):
    codec = make_codec()
    x = audio(key)
    codes = codec.encode(x)
    assert codes.values.shape == (3, 6, 3) and codes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(codes.lengths()), [6, 5, 2])
    assert int(codes.values.min()) >= 0 and int(codes.values.max()) < 16
    carry, streamed = sz.stream(codec.encoder(), x, [4, 8, 12], with_flush=False)
    np.testing.assert_array_equal(np.asarray(streamed.lengths()), [6, 4, 1])
    _, tail = codec.encoder().flush(carry)  # the partial frames of rows 1 and 2
    np.testing.assert_array_equal(np.asarray(tail.lengths()), [0, 1, 1])
    got = sz.Seq.concatenate([streamed, tail]).compacted().rows()
    for g, w in zip(got, codes.rows()):
        np.testing.assert_array_equal(g, w)
    # The tail frame is the frame of the row's last samples followed by zeros.
    padded = sz.Seq.from_lengths(x.values.at[1, 17:].set(0.0)[:, :20], jnp.array([20, 20, 8]))
    np.testing.assert_array_equal(codec.encode(padded).rows()[1], codes.rows()[1])


def test_fewer_quantizers_are_a_prefix(key):
    codec = make_codec()
    x = audio(key)
    full = codec.encode(x)
    for n in (1, 2):
        part = codec.encode(x, num_quantizers=n)
        assert part.values.shape[-1] == n
        for p, f in zip(part.rows(), full.rows()):
            np.testing.assert_array_equal(p, f[:, :n])
    low = codec.with_num_quantizers(1)
    np.testing.assert_array_equal(np.asarray(low.encode(x).values), np.asarray(part.values[..., :1]))


def test_default_config_is_50hz_at_16khz():
    config = CodecConfig()
    assert config.hop_length == 320 and config.frame_rate == 50.0
    assert config.bitrate() == 4000.0 and config.bitrate(2) == 1000.0
    codec = nnx.eval_shape(lambda: Codec(config, rngs=nnx.Rngs(0)))  # abstract: no compute
    assert codec.encoder().spec.block_size == 320
    assert codec.encoder().spec.offline_length(16_000 + 1) == 51
    assert codec.decoder().spec.output_ratio == 320
    assert codec.spec.offline_length(16_000 + 1) == 16_001  # no tail sample lost
    assert codec.spec.outputs_after(16_000 + 1) == 16_000   # the last one comes from flush


def test_bad_input(key):
    codec = make_codec()
    with pytest.raises(ValueError, match="x: expected feature shape"):
        codec.encode(sz.Seq.full(jnp.zeros((2, 8, 2))))
    with pytest.raises(ValueError, match="x: expected floating"):
        codec.encode(sz.Seq.full(jnp.zeros((2, 8, 1), jnp.int32)))
    with pytest.raises(ValueError, match="num_quantizers"):
        codec.encode(audio(key), num_quantizers=4)
    with pytest.raises(ValueError, match="block_size=4"):
        codec.encoder().step(codec.encoder().init_carry(3), audio(key, length=6, lengths=(6, 5, 1)))
    with pytest.raises(ValueError, match="carry"):
        codec.encoder().step(codec.encoder().init_carry(2), audio(key))
    for bad, match in [(dict(strides=()), "strides"), (dict(quantizer="pq"), "quantizer"),
                       (dict(channels=0), "channels"), (dict(quantizer_dropout=2.0), "quantizer_dropout"),
                       (dict(transformer_layers=1, transformer_heads=3), "transformer_heads")]:
        with pytest.raises(ValueError, match=match):
            CodecConfig(**{**TINY.__dict__, **bad})
    with pytest.raises(ValueError, match="rngs"):
        Codec(TINY)
