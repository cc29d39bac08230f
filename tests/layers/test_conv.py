"""Conv1D: offline against a direct NumPy loop, the streaming contract (harness), rows out of
step with each other (stride phases), flush of the look-ahead tail, bfloat16, bad input."""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.layers.conv import Conv1D
from streamzoo.testing import assert_stream_contract

B, T, D_IN, D_OUT = 3, 24, 4, 8
LENGTHS = (T, 17, 7)  # not multiples of any stride: partial stride blocks at the end

CONFIGS = {
    "k3": dict(kernel_size=3),
    "k5_s2_d2_look2": dict(kernel_size=5, stride=2, dilation=2, lookahead=2),
    "k3_s3_depthwise": dict(kernel_size=3, stride=3, groups=D_IN),
    "k1_s2_look2": dict(kernel_size=1, stride=2, lookahead=2),
    "k5_d2_groups2_look2": dict(kernel_size=5, dilation=2, groups=2, lookahead=2),
    "k1_pointwise": dict(kernel_size=1),           # frame-wise: no carry
    "k1_groups2_pointwise": dict(kernel_size=1, groups=2),
}


# The shared jitted drivers: compiles are shared with the harness.
_offline, _step, _flush = sz.jitted_apply, sz.jitted_step, sz.jitted_flush


def make(name, key, dtype=None) -> Conv1D:
    layer = Conv1D(D_IN, D_OUT, **CONFIGS[name], dtype=dtype, rngs=nnx.Rngs(params=key))
    layer.bias[...] = jax.random.normal(jax.random.fold_in(key, 1), (D_OUT,))  # not zeros
    return layer


def ragged(key, lengths=LENGTHS, length=T, dtype=jnp.float32) -> sz.Seq:
    values = jax.random.normal(key, (len(lengths), length, D_IN), dtype)
    return sz.Seq.from_lengths(values, jnp.array(lengths))


def reference(layer: Conv1D, x: sz.Seq) -> list[np.ndarray]:
    """Per row, a float64 loop over output frames: taps ending at (j+1)*s - 1 + lookahead,
    zeros outside the row's valid frames."""
    w = np.asarray(layer.kernel[...], np.float64)
    bias = np.asarray(layer.bias[...], np.float64)
    k, s, d = layer.kernel_size, layer.stride, layer.dilation
    look, g = layer.lookahead, layer.groups
    cin, cout = D_IN // g, D_OUT // g
    out = []
    for row in x.rows():
        row = row.astype(np.float64)
        n = row.shape[0]
        ys = []
        for j in range(n // s):
            y = bias.copy()
            last = (j + 1) * s - 1 + look
            for tap in range(k):
                i = last - (k - 1 - tap) * d
                if 0 <= i < n:
                    for gi in range(g):
                        y[gi * cout:(gi + 1) * cout] += (
                            row[i, gi * cin:(gi + 1) * cin] @ w[tap, :, gi * cout:(gi + 1) * cout])
            ys.append(y)
        out.append(np.array(ys).reshape(-1, D_OUT))
    return out


def assert_rows_close(got: list[np.ndarray], want: list[np.ndarray], tol=1e-5):
    assert [len(r) for r in got] == [len(r) for r in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", CONFIGS)
def test_offline_matches_reference(name, key):
    layer = make(name, key)
    x = ragged(jax.random.fold_in(key, 2))
    y = _offline(layer, x)
    assert y.values.shape == (B, T // layer.stride, D_OUT)
    assert_rows_close(y.rows(), reference(layer, x))
    np.testing.assert_array_equal(np.asarray(y.lengths()),
                                  [n // layer.stride for n in LENGTHS])


@pytest.mark.parametrize("name", CONFIGS)
def test_stream_contract(name, key):
    layer = make(name, key)
    assert_stream_contract(layer, ragged(jax.random.fold_in(key, 2)), num_partitions=2)


def test_pointwise_is_frame_wise_without_carry(key):
    """Kernel 1, stride 1, no look-ahead: a step is the offline map of its chunk, the carry
    holds no arrays, and flush emits nothing."""
    layer = make("k1_pointwise", key)
    assert layer.frame_wise and not make("k1_s2_look2", key).frame_wise
    carry = layer.init_carry(B)
    assert jax.tree.leaves(carry) == []
    x = ragged(jax.random.fold_in(key, 2))
    carry, y = _step(layer, carry, x)
    np.testing.assert_array_equal(np.asarray(y.values), np.asarray(_offline(layer, x).values))
    _, tail = _flush(layer, carry)
    assert tail.length == 0


@pytest.mark.parametrize("name", ["k5_s2_d2_look2", "k3_s3_depthwise"])
def test_rows_out_of_phase(name, key):
    """Random holes in every chunk: rows reach different stride phases and fill levels, and a
    row that has seen 1 frame past a block boundary emits its next output one frame later."""
    layer = make(name, key)
    s = layer.stride
    x = ragged(jax.random.fold_in(key, 2), lengths=(T,) * B, length=2 * T)
    holes = jax.random.bernoulli(jax.random.fold_in(key, 3), 0.35, (B, 2 * T))
    x = sz.Seq(x.values, x.mask & ~holes)
    want = reference(layer, x)
    carry, outs, start = layer.init_carry(B), [], 0
    for size in [s, 2 * s, 4 * s, s, 4 * s, 2 * s] * 4:
        if start + size > x.length:
            size = x.length - start
        if size <= 0:
            break
        carry, y = _step(layer, carry, x.time_slice(start, start + size))
        outs.append(y)
        start += size
    carry, tail = _flush(layer, carry)
    got = sz.Seq.concatenate(outs + [tail]).compacted().rows()
    assert_rows_close(got, want)


def test_flush_emits_lookahead_tail(key):
    layer = make("k5_s2_d2_look2", key)  # lookahead 2 = 1 output frame held back
    x = ragged(jax.random.fold_in(key, 2))
    want = reference(layer, x)
    carry, before = sz.stream(layer, x, [6, 2, 16], with_flush=False)
    for row, n in zip(before.rows(), LENGTHS):
        assert len(row) == layer.spec.outputs_after(n) == n // 2 - 1
    _, tail = _flush(layer, carry)
    assert tail.values.shape == (B, 1, D_OUT)
    assert_rows_close(tail.rows(), [w[-1:] for w in want])
    # Flushing commits nothing: the carry comes back unchanged.
    again, _ = _flush(layer, carry)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(carry)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_long_run_counter_saturates(key):
    """A stream far longer than the history and the counter's cap stays exact."""
    layer = make("k5_s2_d2_look2", key)
    x = ragged(jax.random.fold_in(key, 2), lengths=(96, 91, 60), length=96)
    carry, got = sz.stream(layer, x, 8)
    assert_rows_close(got.rows(), reference(layer, x))
    assert int(carry.seen.max()) < layer.lookahead + 2 * layer.stride


def test_bfloat16(key):
    layer = make("k5_d2_groups2_look2", key, dtype=jnp.bfloat16)
    x = ragged(jax.random.fold_in(key, 2), dtype=jnp.bfloat16)
    offline = _offline(layer, x)
    assert offline.dtype == jnp.bfloat16
    carry, streamed = sz.stream(layer, x, [3, 1, 8, 12], carry=layer.init_carry(B, jnp.bfloat16))
    assert carry.history.dtype == jnp.bfloat16 and carry.seen.dtype == jnp.int32
    assert streamed.dtype == jnp.bfloat16
    assert_rows_close(streamed.rows(), offline.rows(), tol=2e-2)
    assert_rows_close(offline.rows(), reference(layer, x), tol=1e-1)


def test_bad_input(key):
    layer = make("k5_s2_d2_look2", key)
    x = ragged(jax.random.fold_in(key, 2))
    with pytest.raises(ValueError, match=r"x: expected feature shape \(4,\), got \(5,\)"):
        layer(sz.Seq.full(jax.random.normal(key, (B, T, D_IN + 1))))
    with pytest.raises(ValueError, match="x: expected values of rank 3"):
        layer(sz.Seq(jax.random.normal(key, (B, T)), jnp.ones((B, T), bool)))
    with pytest.raises(ValueError, match="x: step input length must be a multiple of block_size=2"):
        layer.step(layer.init_carry(B), x.time_slice(0, 3))
    with pytest.raises(ValueError, match=r"carry.*expected shape \(3, 8, 4\) for batch size 3"):
        layer.step(layer.init_carry(B + 1), x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=3, stride=2, lookahead=1),
     "lookahead: expected a non-negative int multiple of stride=2"),
    (dict(kernel_size=3, groups=3),
     "groups: expected a divisor of in_features=4 and out_features=8, got 3"),
    (dict(kernel_size=0), "kernel_size: expected a positive int, got 0"),
    (dict(kernel_size=3, dilation=0), "dilation: expected a positive int, got 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conv1D(D_IN, D_OUT, **kwargs, rngs=nnx.Rngs(0))


def test_spec():
    layer = Conv1D(D_IN, D_OUT, 5, stride=2, dilation=2, lookahead=4, rngs=nnx.Rngs(0))
    spec = layer.spec
    assert spec.block_size == 2 and spec.output_ratio == Fraction(1, 2)
    assert (spec.input_latency, spec.output_latency) == (4, 2)
    assert spec.receptive_field == (-4.0, 4.0)
    shapes = jax.eval_shape(lambda: layer.init_carry(2))
    assert shapes.history.shape == (2, 8, D_IN) and shapes.seen.shape == (2,)
