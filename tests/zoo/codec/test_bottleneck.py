"""The causal transformer bottleneck (sliding-window attention, KV ring in the carry): its
own streaming contract, and encoder/decoder with it streaming past the window."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.codec.model import causal_transformer
from tests.zoo.codec.common import SHALLOW, audio, make_codec

WITH_TRANSFORMER = dataclasses.replace(SHALLOW, transformer_layers=1, transformer_heads=2,
                                       transformer_window=3, transformer_hidden=16)


def test_transformer_stream_contract(key):
    config = dataclasses.replace(WITH_TRANSFORMER, transformer_layers=2)
    block = causal_transformer(config, rngs=nnx.Rngs(params=key))
    assert block.spec.receptive_field == (-6.0, 0.0)  # 2 layers x window 3
    x = sz.Seq.from_lengths(jax.random.normal(jax.random.fold_in(key, 1), (3, 16, 8)),
                            jnp.array([16, 11, 4]))
    # Gradients and orbax checkpoints of attention and Repeat carries are checked by their own
    # tests (tests/layers/test_attention.py, tests/core/test_combinators.py).
    assert_stream_contract(block, x, num_partitions=1, skip=("gradients", "checkpoint"))


@pytest.mark.slow  # ~1.5 CPU-min; the transformer's own contract runs by default above
def test_codec_halves_with_transformer(key):
    codec = make_codec(WITH_TRANSFORMER)
    assert codec.encoder_transformer is not None and codec.decoder_transformer is not None
    x = audio(key, lengths=(48, 37, 13))  # 12 frames: the 3-frame KV ring wraps
    assert_stream_contract(codec.encoder(), x, num_partitions=1,
                           checks=("partitions", "flush", "reset_rows"))
    # The whole codec (so the decoder's transformer too), streamed in odd chunks, gives
    # exactly the offline samples.
    y = codec(x)
    _, streamed = sz.stream(codec, x, [4, 12, 8, 24])
    for g, w in zip(streamed.rows(), y.rows()):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
