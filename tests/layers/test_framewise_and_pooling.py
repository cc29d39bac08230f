"""Norms, feed-forwards and cumulative mean pooling through the contract harness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from streamzoo import Seq
from streamzoo.layers.feedforward import FeedForward
from streamzoo.layers.norm import LayerNorm, RMSNorm
from streamzoo.layers.pooling import CumulativeMean
from streamzoo.testing import assert_stream_contract

D = 6


@pytest.fixture(scope="module")
def x():
    return Seq.from_lengths(jax.random.normal(jax.random.key(11), (3, 10, D)) * 2 + 0.5,
                            jnp.array([10, 6, 1]))


LAYERS = {
    "rmsnorm": lambda: RMSNorm(D),
    "layernorm": lambda: LayerNorm(D),
    "ffn": lambda: FeedForward(D, 12, rngs=nnx.Rngs(0), activation=jax.nn.gelu),
    "swiglu": lambda: FeedForward(D, 12, out_features=4, gated=True, use_bias=False, rngs=nnx.Rngs(1)),
    "cumulative_mean": lambda: CumulativeMean(D),
}


@pytest.mark.parametrize("name", LAYERS)
def test_contract(name, x):
    assert_stream_contract(LAYERS[name](), x)


def test_norms_match_their_formulas(x):
    v = np.asarray(x.values[0], np.float64)
    rms = np.asarray(RMSNorm(D)(x).values[0])
    np.testing.assert_allclose(rms, v / np.sqrt((v ** 2).mean(-1, keepdims=True) + 1e-6), rtol=1e-5)
    ln = np.asarray(LayerNorm(D)(x).values[0])
    np.testing.assert_allclose(ln, (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6),
                               rtol=1e-4, atol=1e-5)


def test_cumulative_mean_is_the_running_mean(x):
    y = CumulativeMean(D)(x).rows()
    for row, out in zip(x.rows(), y):
        want = np.cumsum(row, 0) / np.arange(1, len(row) + 1)[:, None]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params(x):
    ffn = FeedForward(D, 12, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    y = ffn(x)
    assert y.dtype == jnp.bfloat16 and ffn.up.kernel[...].dtype == jnp.float32
    ref = FeedForward(D, 12, rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(np.asarray(y.values, np.float32), ref.values, atol=0.1, rtol=0.05)
