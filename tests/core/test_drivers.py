import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo import Seq
from tests import toy_layers as toy

D = 3


@pytest.fixture(scope="module")
def model():
    return sz.Serial(toy.DepthwiseCausalConv(D, rngs=nnx.Rngs(0)), toy.NextFrameMix(D, rngs=nnx.Rngs(1)))


@pytest.fixture(scope="module")
def x():
    return Seq.from_lengths(jax.random.normal(jax.random.key(5), (2, 12, D)), jnp.array([12, 8]))


def test_multistep_equals_python_loop(model, x):
    carry, ys = jax.jit(sz.multistep)(model, model.init_carry(2), sz.chunked(x, 4))
    assert ys.values.shape == (3, 2, 4, D)
    carry_loop, y_loop = sz.stream(model, x, 4, with_flush=False)
    for a, b in zip(sz.unchunked(ys).compacted().rows(), y_loop.rows()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(carry_loop)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_stream_with_uneven_sizes_matches_offline(model, x):
    _, y = sz.stream(model, x, [5, 1, 6])
    for a, b in zip(y.rows(), model(x).rows()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_reset_rows_and_carry_nbytes(model):
    carry = model.init_carry(2)
    assert sz.carry_nbytes(carry) == 2 * 2 * D * 4 + 2 * D * 4 + 2 * 4
    assert sz.carry_nbytes(jax.eval_shape(lambda: model.init_carry(2))) == sz.carry_nbytes(carry)
    reset = sz.reset_rows(model, carry, jnp.array([True, False]))
    assert jax.tree.map(jnp.shape, reset) == jax.tree.map(jnp.shape, carry)


def test_pure_gives_a_plain_pytree_step(model, x):
    graphdef, params, step_fn = sz.pure(model)
    carry, y = jax.jit(step_fn)(params, model.init_carry(2), x)
    carry2, y2 = model.step(model.init_carry(2), x)
    np.testing.assert_allclose(y.values, y2.values, atol=1e-6)


def test_jit_step_matches_step_and_shares_one_compilation(model, x):
    want_carry, want = model.step(model.init_carry(2), x)
    step = sz.jit_step(model)
    carry, y = step(model.init_carry(2), x)
    np.testing.assert_allclose(y.values, want.values, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(want_carry)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    _, tail = sz.jit_flush(model)(carry)
    np.testing.assert_allclose(tail.values, model.flush(carry)[1].values, atol=1e-6)
    # Another model of the same structure reuses the jitted function, with its own parameters.
    other = sz.Serial(toy.DepthwiseCausalConv(D, rngs=nnx.Rngs(7)), toy.NextFrameMix(D, rngs=nnx.Rngs(8)))
    other_step = sz.jit_step(other)
    _, y_other = other_step(other.init_carry(2), x)
    np.testing.assert_allclose(y_other.values, other.step(other.init_carry(2), x)[1].values, atol=1e-6)
    assert not np.allclose(y_other.values, y.values)


def test_jit_step_of_a_module_with_an_unhashable_attribute(model, x):
    class Listed(nnx.Module):  # a plain list attribute makes the graph unhashable
        def __init__(self, inner):
            self.inner, self.sizes = inner, [1, 2]

        def step(self, carry, x):
            return self.inner.step(carry, x)

    _, y = sz.jit_step(Listed(model))(model.init_carry(2), x)
    np.testing.assert_allclose(y.values, model.step(model.init_carry(2), x)[1].values, atol=1e-6)


def test_jit_step_donating_the_carry(model, x):
    step = sz.jit_step(model, donate_carry=True)
    carry = model.init_carry(2)
    for piece in (x.time_slice(0, 4), x.time_slice(4, 12)):
        carry, _ = step(carry, piece)
    want, _ = model.step(model.step(model.init_carry(2), x.time_slice(0, 4))[0], x.time_slice(4, 12))
    for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_lax_scan_over_model_step(model, x):
    carry, ys = jax.lax.scan(model.step, model.init_carry(2), sz.chunked(x, 3))
    assert ys.values.shape == (4, 2, 3, D)


@pytest.mark.parametrize("sizes,match", [([5, 5], "sum 10"), (0, "positive int"), ([12, 0], "positive")])
def test_bad_chunk_sizes(model, x, sizes, match):
    with pytest.raises(ValueError, match=match):
        sz.stream(model, x, sizes)


def test_bad_multistep_input(model, x):
    with pytest.raises(ValueError, match="xs: expected a Seq with a leading chunk axis"):
        sz.multistep(model, model.init_carry(2), x.values)
    with pytest.raises(ValueError, match="chunk_size"):
        sz.chunked(x, 5)
