import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from streamzoo import Repeat, Residual, Seq, Serial
from streamzoo.layers.feedforward import FeedForward
from streamzoo.layers.norm import LayerNorm, RMSNorm
from streamzoo.layers.pooling import CumulativeMean
from streamzoo.testing import assert_stream_contract
from tests import toy_layers as toy

D = 4


@pytest.fixture(scope="module")
def x():
    return Seq.from_lengths(jax.random.normal(jax.random.key(3), (3, 12, D)), jnp.array([12, 7, 2]))


def test_serial_of_lookahead_and_conv(x):
    r = nnx.Rngs(0)
    model = Serial(toy.NextFrameMix(D, rngs=r), toy.DepthwiseCausalConv(D, rngs=r),
                   toy.NextFrameMix(D, rngs=r))
    assert model.spec.output_latency == 2 and model.spec.receptive_field == (-2, 2)
    assert_stream_contract(model, x)


def test_residual_delays_its_skip_path_to_match_lookahead(x):
    r = nnx.Rngs(1)
    model = Residual(Serial(toy.NextFrameMix(D, rngs=r), toy.NextFrameMix(D, rngs=r)))
    assert model.spec.output_latency == 2
    assert_stream_contract(model, x)


def test_repeat_stacks_params_and_carries(x):
    model = Repeat(lambda rngs: Serial(RMSNorm(D), Residual(FeedForward(D, 8, rngs=rngs)),
                                       toy.DepthwiseCausalConv(D, rngs=rngs)), 3, rngs=nnx.Rngs(2))
    carry = model.init_carry(3)
    assert jax.tree.map(jnp.shape, carry).layers.layers[2].buffer == (3, 3, 2, D)
    kernels = model.layers.layers[1].inner.up.kernel[...]
    assert kernels.shape == (3, D, 8) and not np.allclose(kernels[0], kernels[1])
    assert model.spec.receptive_field == (-6, 0)
    assert_stream_contract(model, x)


def test_repeat_with_lookahead_flushes_through_the_stack(x):
    model = Repeat(lambda rngs: Residual(toy.NextFrameMix(D, rngs=rngs)), 2, rngs=nnx.Rngs(3))
    assert model.spec.output_latency == 2
    assert_stream_contract(model, x, checks=("partitions", "flush", "reset_rows", "gradients"))


def test_stateless_stack_has_no_carry_leaves(x):
    model = Repeat(lambda rngs: Serial(LayerNorm(D), Residual(FeedForward(D, 8, rngs=rngs))), 4,
                   rngs=nnx.Rngs(4))
    assert jax.tree_util.tree_leaves(model.init_carry(3)) == []
    assert model.init_carry(3).batch_size == 3
    assert_stream_contract(model, x, checks=("partitions", "reset_rows", "carry"))


def test_serial_that_changes_feature_size_flushes(x):
    model = Serial(LayerNorm(D), FeedForward(D, 8, out_features=3, rngs=nnx.Rngs(5)), CumulativeMean(3))
    assert_stream_contract(model, x, checks=("partitions", "flush"))


def test_bad_compositions_are_clear_errors():
    r = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"layers\[1\]: expected input feature shape \(4,\)"):
        Serial(RMSNorm(4), CumulativeMean(5))
    with pytest.raises(ValueError, match="layers: expected at least one"):
        Serial()
    with pytest.raises(ValueError, match="num_layers"):
        Repeat(lambda rngs: RMSNorm(4), 0, rngs=r)
    with pytest.raises(ValueError, match="inner: a residual needs"):
        Residual(FeedForward(4, 8, out_features=3, rngs=r))
