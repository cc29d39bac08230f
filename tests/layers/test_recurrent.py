"""LSTM and GRU: the textbook equations, streaming == offline, per-row state advance,
gradients, bfloat16 compute with float32 state, errors, and the streaming contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.core import jitted_apply as offline
from streamzoo.core import jitted_step as step
from streamzoo.layers.recurrent import GRU, LSTM
from streamzoo.testing import assert_stream_contract

B, T, D, H = 3, 24, 8, 12
LAYERS = {"lstm": LSTM, "gru": GRU}
BF16_CHECKS = ("partitions", "exec_mask", "gradients")
POOL = 4096  # random inputs are slices of one draw: one PRNG compile, not one per shape


def randn(key, shape, dtype=jnp.float32):
    n = int(np.prod(shape))
    return jax.random.normal(key, (POOL,))[:n].reshape(shape).astype(dtype)


def make(name, dtype=None, seed=0):
    return LAYERS[name](D, H, dtype=dtype, rngs=nnx.Rngs(seed))


def ragged(key, lengths=(T, 17, 5), length=T):
    return sz.Seq.from_lengths(randn(key, (len(lengths), length, D)), jnp.array(lengths))


def assert_rows_close(got: sz.Seq, want: sz.Seq, tol=1e-5):
    got_rows, want_rows = got.rows(), want.rows()
    assert [len(r) for r in got_rows] == [len(r) for r in want_rows]
    for g, w in zip(got_rows, want_rows):
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), atol=tol, rtol=tol)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def reference(layer, x: sz.Seq) -> list[np.ndarray]:
    """A per-row float64 NumPy loop over the valid frames, written from the textbook cells."""
    wi = np.asarray(layer.input_proj.kernel[...], np.float64)
    bi = np.asarray(layer.input_proj.bias[...], np.float64)
    wh = np.asarray(layer.recurrent_kernel[...], np.float64)
    out = []
    for row in x.rows():
        h, c, ys = np.zeros(H), np.zeros(H), []
        for frame in row.astype(np.float64):
            if isinstance(layer, LSTM):
                i, f, g, o = np.split(frame @ wi + bi + h @ wh, 4)
                c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
                h = sigmoid(o) * np.tanh(c)
            else:
                bh = np.asarray(layer.recurrent_bias[...], np.float64)
                xr, xz, xn = np.split(frame @ wi + bi, 3)
                hr, hz, hn = np.split(h @ wh + bh, 3)
                r, z = sigmoid(xr + hr), sigmoid(xz + hz)
                h = (1 - z) * np.tanh(xn + r * hn) + z * h
            ys.append(h)
        out.append(np.array(ys).reshape(-1, H))
    return out


@pytest.mark.parametrize("name", LAYERS)
def test_offline_matches_reference(name, key):
    layer = make(name)
    x = ragged(key)
    y = offline(layer, x)
    assert y.values.shape == (B, T, H) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y.mask), np.asarray(x.mask))
    for got, want in zip(y.rows(), reference(layer, x)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(y.values)[~np.asarray(y.mask)])  # invalid outputs are zero
    if isinstance(layer, LSTM):  # forget-gate bias starts at 1
        np.testing.assert_array_equal(layer.input_proj.bias[H:2 * H], 1.0)


@pytest.mark.parametrize("name", LAYERS)
def test_stream_equals_offline(name, key):
    layer = make(name)
    x = ragged(key)
    want = offline(layer, x)
    assert layer.spec.receptive_field == (-float("inf"), 0.0)
    for chunks in (1, [5, 1, 5, 1, 5, 5, 2]):  # size-1 blocks; odd sizes (the contract adds more)
        _, got = sz.stream(layer, x, chunks)
        assert_rows_close(got, want)


@pytest.mark.parametrize("name", LAYERS)
def test_invalid_frames_do_not_move_the_state(name, key):
    """Per row, the state advances by that row's own count of valid frames only."""
    layer = make(name)
    k1, k2, k3 = jax.random.split(key, 3)
    carry, _ = step(layer, layer.init_carry(B), ragged(k1, length=8, lengths=(6, 3, 0)))
    garbage = sz.Seq(jnp.full((B, 8, D), jnp.nan), jnp.zeros((B, 8), bool))
    same, y = step(layer, carry, garbage)
    jax.tree.map(np.testing.assert_array_equal, same, carry)
    assert not np.any(np.asarray(y.values)) and not np.any(np.asarray(y.mask))
    moved, _ = step(layer, carry, ragged(k2, length=8, lengths=(4, 0, 2)))
    jax.tree.map(lambda n, o: np.testing.assert_array_equal(n[1], o[1]), moved, carry)
    assert not np.array_equal(moved.h[0], carry.h[0])
    # Interior invalid frames (holding NaN) in one step equal the same frames packed.
    x = ragged(k3, length=8, lengths=(8, 5, 2))
    mask = np.zeros((B, 16), bool)
    mask[0, 1::2], mask[1, [0, 4, 5, 11, 15]], mask[2, [7, 9]] = True, True, True
    values = np.full((B, 16, D), np.nan, np.float32)
    for b, row in enumerate(x.rows()):
        values[b, mask[b]] = row
    spread_carry, spread_y = step(layer, carry, sz.Seq(jnp.asarray(values), jnp.asarray(mask)))
    packed_carry, packed_y = step(layer, carry, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), spread_carry, packed_carry)
    assert np.isfinite(np.asarray(spread_y.values)).all()
    assert_rows_close(spread_y, packed_y, tol=1e-6)


@pytest.mark.parametrize("name", LAYERS)
def test_gradients_finite(name, key):
    """Gradients w.r.t. parameters and inputs are finite even with NaN in masked frames."""
    layer = make(name)
    k1, k2 = jax.random.split(key)
    x = ragged(k1)
    poisoned = jnp.where(x.mask[..., None], x.values, jnp.nan)
    weights = randn(k2, (B, T, H))
    graphdef, params = nnx.split(layer)

    def loss(p, values):
        return jnp.sum(nnx.merge(graphdef, p)(sz.Seq(values, x.mask)).values * weights)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, poisoned)
    for g in jax.tree.leaves(g_params) + [g_x]:
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
    np.testing.assert_array_equal(np.asarray(g_x)[~np.asarray(x.mask)], 0.0)


@pytest.mark.parametrize("name", LAYERS)
def test_bfloat16_compute_float32_state(name, key):
    layer = make(name, dtype=jnp.bfloat16)
    x = ragged(key)
    shapes = jax.eval_shape(lambda: layer.init_carry(B, jnp.bfloat16))
    assert all(s.shape == (B, H) and s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
    carry, y = step(layer, layer.init_carry(B, jnp.bfloat16), x)
    assert y.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(carry))
    # bf16 input with dtype=None computes in bf16 too; both stay close to float32.
    fp32 = make(name)
    assert offline(fp32, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert_rows_close(y, offline(fp32, x), tol=5e-2)


@pytest.mark.parametrize("name", LAYERS)
def test_bad_inputs(name, key):
    cls = LAYERS[name]
    with pytest.raises(ValueError, match="in_features"):
        cls(0, H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden"):
        cls(D, 2.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dtype"):
        cls(D, H, dtype=jnp.int32, rngs=nnx.Rngs(0))
    layer = make(name)
    x = ragged(key)
    with pytest.raises(ValueError, match="x: expected feature shape"):
        layer(sz.Seq.full(jnp.concatenate([x.values, x.values[..., :1]], -1)))
    with pytest.raises(ValueError, match="x: expected floating"):
        layer(sz.Seq.full(jnp.round(x.values * 9).astype(jnp.int32)))
    with pytest.raises(ValueError, match="carry"):
        layer.step(layer.init_carry(B + 1), x)
    # Carries of another config / another cell (no parameters needed: eval_shape).
    for other in (lambda: cls(D, H + 1, rngs=nnx.Rngs(0)),
                  lambda: (GRU if name == "lstm" else LSTM)(D, H, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match="carry"):
            layer.step(nnx.eval_shape(other).init_carry(B), x)


@pytest.mark.parametrize("name", LAYERS)
def test_stream_contract(name, key):
    # long_length=144: a run 6x the test length (the carry has no ring to wrap).
    assert_stream_contract(make(name), ragged(key), long_length=144)
    # bfloat16 compute, float32 state: the dtype-sensitive checks at bfloat16 tolerances.
    assert_stream_contract(make(name, dtype=jnp.bfloat16), ragged(key), atol=2e-2, rtol=2e-2,
                           grad_atol=2e-2, checks=BF16_CHECKS)
