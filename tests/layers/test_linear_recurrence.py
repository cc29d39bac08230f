"""LinearRecurrence and linear_scan: the scan vs a loop, streaming == offline, masking as
exact identity, saturated gates, dtypes, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.core import jitted_apply as offline
from streamzoo.core import jitted_step as step
from streamzoo.layers.linear_recurrence import LinearRecurrence, linear_scan
from streamzoo.testing import assert_stream_contract

B, T, D, H, O = 3, 24, 8, 16, 5
BF16_CHECKS = ("partitions", "exec_mask", "gradients")
POOL = 4096  # random inputs are slices of one draw: one PRNG compile, not one per shape


def randn(key, shape, dtype=jnp.float32):
    n = int(np.prod(shape))
    return jax.random.normal(key, (POOL,))[:n].reshape(shape).astype(dtype)


def make(dtype=None, seed=0, out_features=O):
    return LinearRecurrence(D, H, out_features=out_features, dtype=dtype, rngs=nnx.Rngs(seed))


def ragged(key, lengths=(T, 17, 5), length=T):
    return sz.Seq.from_lengths(randn(key, (len(lengths), length, D)), jnp.array(lengths))


def assert_rows_close(got: sz.Seq, want: sz.Seq, tol=1e-5):
    got_rows, want_rows = got.rows(), want.rows()
    assert [len(r) for r in got_rows] == [len(r) for r in want_rows]
    for g, w in zip(got_rows, want_rows):
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), atol=tol, rtol=tol)


def loop_scan(a, b, h0):
    """The recurrence as a plain Python loop in float64."""
    a, b, h = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(h0, np.float64)
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return np.stack(out, 1) if out else b, h


@pytest.mark.parametrize("shape", [(3, 37, 16), (2, 1, 5), (2, 0, 4), (1, 20, 2, 3)])
def test_linear_scan_matches_loop(shape, key):
    ka, kb, kh = jax.random.split(key, 3)
    a = jax.nn.sigmoid(randn(ka, shape) + 2.0)  # decays in (0, 1), most near 0.9
    b = randn(kb, shape)
    h0 = randn(kh, shape[:1] + shape[2:])
    h_all, h_last = jax.jit(linear_scan)(a, b, h0)
    want_all, want_last = loop_scan(a, b, h0)
    assert h_all.shape == shape and h_last.shape == h0.shape
    np.testing.assert_allclose(h_all, want_all, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h_last, want_last, atol=1e-5, rtol=1e-5)


def test_linear_scan_chunked_equals_whole(key):
    """Scanning chunk by chunk from the carried state equals one scan (the streaming path)."""
    ka, kb, kh = jax.random.split(key, 3)
    a = jax.nn.sigmoid(randn(ka, (2, 21, 8)) + 3.0)
    b = randn(kb, (2, 21, 8))
    h = randn(kh, (2, 8))
    scan = jax.jit(linear_scan)
    whole, last = scan(a, b, h)
    parts = []
    for lo, hi in [(0, 1), (1, 11), (11, 21)]:
        part, h = scan(a[:, lo:hi], b[:, lo:hi], h)
        parts.append(part)
    np.testing.assert_allclose(jnp.concatenate(parts, 1), whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, last, atol=1e-5, rtol=1e-5)


def test_linear_scan_bad_shapes(key):
    a = randn(key, (2, 5, 4))
    with pytest.raises(ValueError, match="a, b"):
        linear_scan(a, a[:, :4], a[:, 0])
    with pytest.raises(ValueError, match="h0"):
        linear_scan(a, a, a[:, 0, :3])


def reference(layer, x: sz.Seq) -> list[np.ndarray]:
    """The layer as a per-row float64 NumPy loop over the valid frames."""
    f64 = lambda p: np.asarray(p[...], np.float64)
    w_in, b_in = f64(layer.in_proj.kernel), f64(layer.in_proj.bias)
    w_out, b_out = f64(layer.out_proj.kernel), f64(layer.out_proj.bias)
    rate = layer.c * np.log1p(np.exp(f64(layer.decay)))
    out = []
    for row in x.rows():
        h, ys = np.zeros(H), []
        for frame in row.astype(np.float64):
            gate, u = np.split(frame @ w_in + b_in, 2)
            a = np.exp(-rate / (1 + np.exp(-gate)))
            h = a * h + np.sqrt(1 - a * a) * u
            ys.append(h @ w_out + b_out)
        out.append(np.array(ys).reshape(-1, layer.out_features))
    return out


def test_offline_matches_reference(key):
    layer = make()
    x = ragged(key)
    y = offline(layer, x)
    assert y.values.shape == (B, T, O) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y.mask), np.asarray(x.mask))
    for got, want in zip(y.rows(), reference(layer, x)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(y.values)[~np.asarray(y.mask)])
    # At gate 1 the initial decays lie in [min_decay, max_decay].
    a = np.exp(-layer.c * np.asarray(jax.nn.softplus(layer.decay[...])))
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6


def test_stream_equals_offline(key):
    layer = make()
    x = ragged(key)
    want = offline(layer, x)
    assert layer.spec.receptive_field == (-float("inf"), 0.0)
    for chunks in (1, [5, 1, 5, 1, 5, 5, 2]):  # size-1 blocks; odd sizes (the contract adds more)
        _, got = sz.stream(layer, x, chunks)
        assert_rows_close(got, want)


def test_invalid_frames_are_identities(key):
    layer = make()
    k1, k2, k3 = jax.random.split(key, 3)
    x = ragged(k1)
    a, b = jax.jit(lambda m, x: m.coefficients(x))(layer, x)
    invalid = ~np.asarray(x.mask)
    assert np.all(np.asarray(a)[invalid] == 1.0) and np.all(np.asarray(b)[invalid] == 0.0)
    valid = np.asarray(a)[~invalid]
    assert valid.min() > 0.0 and valid.max() < 1.0
    carry, _ = step(layer, layer.init_carry(B), ragged(k2, length=8, lengths=(6, 3, 0)))
    garbage = sz.Seq(jnp.full((B, 8, D), jnp.nan), jnp.zeros((B, 8), bool))
    same, y = step(layer, carry, garbage)
    np.testing.assert_array_equal(same.h, carry.h)
    assert not np.any(np.asarray(y.values)) and not np.any(np.asarray(y.mask))
    # Interior invalid frames (holding NaN) in one step equal the same frames packed.
    x = ragged(k3, length=8, lengths=(8, 5, 2))
    mask = np.zeros((B, 16), bool)
    mask[0, 1::2], mask[1, [0, 4, 5, 11, 15]], mask[2, [7, 9]] = True, True, True
    values = np.full((B, 16, D), np.nan, np.float32)
    for row_b, row in enumerate(x.rows()):
        values[row_b, mask[row_b]] = row
    spread_carry, spread_y = step(layer, carry, sz.Seq(jnp.asarray(values), jnp.asarray(mask)))
    packed_carry, packed_y = step(layer, carry, x)
    np.testing.assert_allclose(spread_carry.h, packed_carry.h, atol=1e-6)
    np.testing.assert_array_equal(spread_carry.h[2:], packed_carry.h[2:])
    assert np.isfinite(np.asarray(spread_y.values)).all()
    assert_rows_close(spread_y, packed_y, tol=1e-6)


def test_gradients_finite(key):
    """Finite gradients with NaN in masked frames, and with saturated gates (row 1: a == 1
    in float32 where the gate underflows)."""
    layer = make()
    k1, k2 = jax.random.split(key)
    x = ragged(k1)
    x = x.replace(values=x.values * jnp.array([1.0, 300.0, 1.0])[:, None, None])
    a, _ = jax.jit(lambda m, x: m.coefficients(x))(layer, x)
    assert np.any(np.asarray(a)[1][np.asarray(x.mask)[1]] == 1.0)
    poisoned = jnp.where(x.mask[..., None], x.values, jnp.nan)
    weights = randn(k2, (B, T, O))
    graphdef, params = nnx.split(layer)

    def loss(p, values):
        return jnp.sum(nnx.merge(graphdef, p)(sz.Seq(values, x.mask)).values * weights)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, poisoned)
    for g in jax.tree.leaves(g_params) + [g_x]:
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
    np.testing.assert_array_equal(np.asarray(g_x)[~np.asarray(x.mask)], 0.0)


def test_bfloat16_compute_float32_state(key):
    layer = make(dtype=jnp.bfloat16)
    x = ragged(key)
    shapes = jax.eval_shape(lambda: layer.init_carry(B, jnp.bfloat16))
    assert shapes.h.shape == (B, H) and shapes.h.dtype == jnp.float32
    carry, y = step(layer, layer.init_carry(B, jnp.bfloat16), x)
    assert y.dtype == jnp.bfloat16 and carry.h.dtype == jnp.float32
    fp32 = make()
    assert offline(fp32, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert_rows_close(y, offline(fp32, x), tol=5e-2)


def test_bad_inputs(key):
    for kw, name in [(dict(in_features=0), "in_features"), (dict(hidden=-3), "hidden"),
                     (dict(out_features=2.0), "out_features"), (dict(c=0.0), "c"),
                     (dict(min_decay=0.99, max_decay=0.9), "min_decay"),
                     (dict(dtype=jnp.int8), "dtype")]:
        args = dict(in_features=D, hidden=H, rngs=nnx.Rngs(0)) | kw
        with pytest.raises(ValueError, match=name):
            LinearRecurrence(**args)
    layer = make()
    x = ragged(key)
    with pytest.raises(ValueError, match="x: expected feature shape"):
        layer(sz.Seq.full(jnp.concatenate([x.values, x.values[..., :1]], -1)))
    with pytest.raises(ValueError, match="x: expected floating"):
        layer(sz.Seq.full(jnp.round(x.values * 9).astype(jnp.int32)))
    with pytest.raises(ValueError, match="carry"):
        step(layer, layer.init_carry(B + 1), x)
    other = nnx.eval_shape(lambda: LinearRecurrence(D, H + 1, rngs=nnx.Rngs(0)))  # no params
    with pytest.raises(ValueError, match="carry"):
        step(layer, other.init_carry(B), x)


def test_stream_contract(key):
    # long_length=144: a run 6x the test length (the carry has no ring to wrap).
    assert_stream_contract(make(), ragged(key), long_length=144)
    # bfloat16 compute, float32 state: the dtype-sensitive checks at bfloat16 tolerances.
    assert_stream_contract(make(dtype=jnp.bfloat16), ragged(key), atol=2e-2, rtol=2e-2,
                           grad_atol=2e-2, checks=BF16_CHECKS)
