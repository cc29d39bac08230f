"""Codec decoder (codes -> audio): the streaming contract (incl. gradients through the
transposed convolutions), output lengths, lower bitrates, bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import streamzoo as sz
from streamzoo.testing import assert_stream_contract
from tests.zoo.codec.common import codes, make_codec


def test_stream_contract(key):
    dec = make_codec().decoder()
    assert dec.spec.output_ratio == 4 and dec.spec.block_size == 1
    assert_stream_contract(dec, codes(key), num_partitions=1, checks=("partitions", "flush", "batch"))


@pytest.mark.slow  # ~50 CPU-s; the default run checks partitions, flush and batch above
def test_full_stream_contract(key):
    assert_stream_contract(make_codec().decoder(), codes(key), num_partitions=2)


def test_lengths_and_streaming(key):
    codec = make_codec()
    c = codes(key)
    y = codec.decode(c)
    assert y.values.shape == (3, 32, 1) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y.lengths()), [32, 20, 8])  # m * hop
    _, streamed = sz.stream(codec.decoder(), c, [1, 3, 4])
    for g, w in zip(streamed.rows(), y.rows()):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_lower_bitrate_decodes_the_first_codebooks(key):
    codec = make_codec()
    c = codes(key)
    two = codec.decode(c.replace(values=c.values[..., :2]))
    # Code -1 marks an inactive quantizer: the same as decoding without it.
    masked = codec.decode(c.replace(values=c.values.at[..., 2].set(-1)))
    np.testing.assert_allclose(np.asarray(two.values), np.asarray(masked.values), atol=1e-6)
    full = codec.decode(c)
    assert not np.allclose(np.asarray(full.values), np.asarray(two.values))
    dec2 = codec.decoder(2)
    assert dec2.in_features == 2
    _, streamed = sz.stream(dec2, c.replace(values=c.values[..., :2]), 3)
    for g, w in zip(streamed.rows(), two.rows()):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_bad_input(key):
    codec = make_codec()
    c = codes(key)
    with pytest.raises(ValueError, match="x: expected integer"):
        codec.decoder()(c.replace(values=c.values.astype(jnp.float32)))
    with pytest.raises(ValueError, match="x: expected feature shape"):
        codec.decoder()(c.replace(values=c.values[..., :2]))
    with pytest.raises(ValueError, match="num_quantizers"):
        codec.decoder(4)
    with pytest.raises(ValueError, match="codes: expected a streamzoo.Seq"):
        codec.decode(c.values)
    with pytest.raises(ValueError, match="num_quantizers"):
        codec.decode(sz.Seq.full(jnp.zeros((2, 3, 4), jnp.int32)))
