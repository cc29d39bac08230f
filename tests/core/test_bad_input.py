"""Bad input fails at trace time with a ValueError naming the argument, expected and actual."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo import Seq
from streamzoo.layers.pooling import CumulativeMean
from tests import toy_layers as toy

D = 4


def _x(shape=(2, 6, D), seed=0):
    return Seq.full(jax.random.normal(jax.random.key(seed), shape))


@pytest.fixture(scope="module")
def model():
    r = nnx.Rngs(0)
    return sz.Serial(toy.DepthwiseCausalConv(D, rngs=r), CumulativeMean(D))


CASES = [
    ("wrong feature size", lambda m: m(_x((2, 6, D + 1))), r"x: expected feature shape \(4,\), got \(5,\)"),
    ("wrong rank", lambda m: m(_x((2, 6)).replace(values=jnp.zeros((2, 6)))), r"x: expected values of rank 3"),
    ("integer values", lambda m: m(_x().replace(values=jnp.arange(48).reshape(2, 6, D))), r"x: expected floating-kind values, got dtype int"),
    ("mask of the wrong shape", lambda m: m(_x().replace(mask=jnp.ones((2, 5), bool))), r"x.mask: expected shape \(2, 6\) \[B, T\], got \(2, 5\)"),
    ("mask of the wrong dtype", lambda m: m(_x().replace(mask=jnp.ones((2, 6), jnp.int32))), r"x.mask: expected dtype bool, got int32"),
    ("not a Seq", lambda m: m(jnp.zeros((2, 6, D))), r"x: expected a streamzoo.Seq, got ArrayImpl"),
    ("carry of another batch size", lambda m: m.step(m.init_carry(3), _x()), r"carry.*expected shape \(2, 2, 4\) for batch size 2, got \(3, 2, 4\)"),
    ("carry of another model", lambda m: m.step(CumulativeMean(D).init_carry(2), _x()), r"carry: expected the carry structure of Serial"),
    ("carry of another config", lambda m: m.step(sz.Serial(toy.DepthwiseCausalConv(D, 5, rngs=nnx.Rngs(0)), CumulativeMean(D)).init_carry(2), _x()), r"expected shape \(2, 2, 4\).*got \(2, 4, 4\)"),
    ("bad batch size", lambda m: m.init_carry(0), r"batch_size: expected a positive int, got 0"),
    ("bad reset rows", lambda m: m.reset_rows(m.init_carry(2), jnp.array([1, 0])), r"rows: expected a bool array of shape \(2,\), got int32\[2\]"),
]


@pytest.mark.parametrize("name,call,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_value_error(model, name, call, match):
    with pytest.raises(ValueError, match=match):
        call(model)


def test_errors_are_raised_at_trace_time_under_jit(model):
    step = jax.jit(lambda m, c, x: m.step(c, x))
    with pytest.raises(ValueError, match="expected feature shape"):
        step(model, model.init_carry(2), _x((2, 6, D + 2)))


def test_step_length_must_be_a_multiple_of_block_size():
    from streamzoo import StreamSpec

    class Strided(CumulativeMean):
        @property
        def spec(self):
            return StreamSpec(block_size=4)

    m = Strided(D)
    with pytest.raises(ValueError, match="x: step input length must be a multiple of block_size=4, got T=6"):
        m.step(m.init_carry(2), _x())
