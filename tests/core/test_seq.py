import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamzoo import Seq


def _random(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def test_from_lengths_masks_a_prefix_and_is_compact():
    x = Seq.from_lengths(_random((3, 6, 2)), jnp.array([6, 2, 0]))
    assert x.compact
    np.testing.assert_array_equal(x.lengths(), [6, 2, 0])
    np.testing.assert_array_equal(x.mask[1], [True, True, False, False, False, False])


def test_compacted_moves_valid_frames_in_order_and_zeroes_the_rest():
    values = _random((2, 5, 3))
    mask = jnp.array([[False, True, False, True, True], [True, False, False, False, True]])
    y = Seq(values.at[~mask].set(jnp.nan), mask).compacted()
    assert y.compact
    np.testing.assert_array_equal(y.mask, [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(y.values[0, :3], values[0, jnp.array([1, 3, 4])])
    np.testing.assert_array_equal(y.values[1, :2], values[1, jnp.array([0, 4])])
    assert np.all(np.asarray(y.values)[~np.asarray(y.mask)] == 0)


def test_pad_slice_concatenate_and_rows():
    x = Seq.from_lengths(_random((2, 5, 1)), jnp.array([5, 3]))
    p = x.pad_to_multiple(4)
    assert p.length == 8 and p.compact and int(p.lengths()[0]) == 5
    both = Seq.concatenate([x.time_slice(0, 2), x.time_slice(2, 5)])
    for a, b in zip(both.rows(), x.rows()):
        np.testing.assert_array_equal(a, b)
    assert [r.shape[0] for r in x.rows()] == [5, 3]


def test_full_and_empty():
    assert bool(Seq.full(_random((2, 3))).mask.all())
    e = Seq.empty(4, (3,), jnp.bfloat16)
    assert e.values.shape == (4, 0, 3) and e.dtype == jnp.bfloat16


@pytest.mark.parametrize("call,match", [
    (lambda: Seq.from_lengths(jnp.ones(3), jnp.array([1])), "values: expected rank >= 2"),
    (lambda: Seq.from_lengths(_random((2, 3, 1)), jnp.array([1, 2, 3])), "lengths: expected shape"),
    (lambda: Seq.full(_random((3,))), "values: expected rank >= 2"),
    (lambda: Seq.concatenate([]), "seqs: expected at least one"),
])
def test_bad_construction_is_a_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
