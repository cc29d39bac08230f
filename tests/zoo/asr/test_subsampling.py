"""ConvSubsampling: lengths and values against the composition of its convs, the streaming
contract, bad input."""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.asr import ConvSubsampling

F_IN, D = 6, 8


@pytest.mark.parametrize("factor", [4, 8])
def test_offline_is_its_convs(factor, key):
    sub = ConvSubsampling(F_IN, D, factor=factor, channels=5, rngs=nnx.Rngs(params=key))
    assert sub.spec.output_ratio == Fraction(1, factor) and sub.spec.output_latency == 0
    x = sz.Seq.from_lengths(jax.random.normal(key, (2, 35, F_IN)), jnp.array([35, 17]))
    got = sz.jitted_apply(sub, x)
    assert list(np.asarray(got.lengths())) == [35 // factor, 17 // factor]

    @jax.jit
    def composed(sub, h):
        for conv in sub.convs:
            h = conv(h).map(jax.nn.silu)
        return h.values @ sub.proj.kernel[...] + sub.proj.bias[...]

    want = composed(sub, x)
    for b, n in enumerate(np.asarray(got.lengths())):
        np.testing.assert_allclose(got.values[b, :n], want[b, :n], atol=1e-5)


@pytest.mark.slow  # the encoder's harness (test_encoder.py) streams this layer by default
def test_stream_contract(key):
    sub = ConvSubsampling(F_IN, D, factor=4, rngs=nnx.Rngs(params=key))
    x = sz.Seq.from_lengths(jax.random.normal(key, (3, 24, F_IN)), jnp.array([24, 15, 3]))
    assert_stream_contract(sub, x)


def test_bad_input(key):
    for factor in (1, 3, 6, 0):
        with pytest.raises(ValueError, match="factor"):
            ConvSubsampling(F_IN, D, factor=factor, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        ConvSubsampling(F_IN, D, channels=0, rngs=nnx.Rngs(0))
    sub = ConvSubsampling(F_IN, D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_size=4"):
        sub.step(sub.init_carry(1), sz.Seq.full(jax.random.normal(key, (1, 6, F_IN))))
