"""PackedCarry: a carry as one buffer per dtype; the jitted drivers step it like the carry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

import streamzoo as sz
from streamzoo import Seq
from tests import toy_layers as toy

D = 3


@struct.dataclass
class Mixed:
    a: jax.Array
    counts: jax.Array
    flags: jax.Array
    nested: tuple


def mixed_carry(key):
    k = jax.random.split(key, 4)
    return Mixed(jax.random.normal(k[0], (2, 3, 4)),
                 jax.random.randint(k[1], (2,), -50, 50, jnp.int32),
                 jax.random.bernoulli(k[2], 0.5, (2, 5)),
                 (jax.random.normal(k[3], (2, 1), jnp.bfloat16), jnp.zeros((2, 0), jnp.float32)))


def test_pack_unpack_round_trip_is_exact(key):
    carry = mixed_carry(key)
    packed = sz.pack_carry(carry)
    assert [b.dtype for b in packed.buffers] == [jnp.float32, jnp.int32, jnp.bool_, jnp.bfloat16]
    assert [b.ndim for b in packed.buffers] == [1, 1, 1, 1]
    assert packed.buffers[0].size == 2 * 3 * 4
    back = packed.unpack()
    assert jax.tree.structure(back) == jax.tree.structure(carry)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(carry)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Under jit, and as a pytree: its only leaves are the buffers.
    again = jax.jit(lambda c: sz.pack_carry(c).unpack())(carry)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(carry)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(jax.tree.leaves(packed)) == 4


@pytest.fixture(scope="module")
def model():
    return sz.Serial(toy.DepthwiseCausalConv(D, rngs=nnx.Rngs(0)),
                     toy.NextFrameMix(D, rngs=nnx.Rngs(1)))


@pytest.mark.parametrize("driver", ["jit_step", "jit_step_donated", "jitted_step", "pure"])
def test_drivers_step_a_packed_carry_like_the_carry(model, driver, key):
    x = Seq.from_lengths(jax.random.normal(key, (2, 12, D)), jnp.array([12, 7]))
    _, params, step_fn = sz.pure(model)
    step = {"jit_step": sz.jit_step(model),
            "jit_step_donated": sz.jit_step(model, donate_carry=True),
            "jitted_step": lambda c, x: sz.jitted_step(model, c, x),
            "pure": lambda c, x: jax.jit(step_fn)(params, c, x)}[driver]
    carry, packed = model.init_carry(2), sz.pack_carry(model.init_carry(2))
    for start, stop in ((0, 4), (4, 8), (8, 12)):
        piece = x.time_slice(start, stop)
        carry, want = model.step(carry, piece)
        packed, got = step(packed, piece)
        assert isinstance(packed, sz.PackedCarry)
        np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))
        np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    for a, b in zip(jax.tree.leaves(packed.unpack()), jax.tree.leaves(carry)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    packed_after, tail = sz.jit_flush(model)(packed)
    np.testing.assert_array_equal(np.asarray(tail.values),
                                  np.asarray(model.flush(carry)[1].values))
    assert isinstance(packed_after, sz.PackedCarry)


def test_bad_carry():
    with pytest.raises(ValueError, match="carry: expected an unpacked carry"):
        sz.pack_carry(sz.pack_carry({"a": jnp.ones(2)}))
    with pytest.raises(ValueError, match="carry: expected a pytree of arrays"):
        sz.pack_carry({"a": 3.0})
