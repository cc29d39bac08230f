"""ConvTranspose1D: offline against a direct NumPy scatter loop, the streaming contract
(harness), the overlap tail kept in the carry, bfloat16, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.layers.conv_transpose import ConvTranspose1D
from streamzoo.testing import assert_stream_contract

B, T, D_IN, D_OUT = 3, 16, 4, 8
LENGTHS = (T, 11, 3)

CONFIGS = {
    "k4_s2": dict(kernel_size=4, stride=2),
    "k3_s3": dict(kernel_size=3, stride=3),
    "k5_s2_groups2": dict(kernel_size=5, stride=2, groups=2),
    "k2_s3_depthwise": dict(kernel_size=2, stride=3, groups=D_IN),  # K < stride: gaps, no overlap
}


# The shared jitted drivers: compiles are shared with the harness.
_offline, _step = sz.jitted_apply, sz.jitted_step


def make(name, key, dtype=None) -> ConvTranspose1D:
    layer = ConvTranspose1D(D_IN, D_OUT, **CONFIGS[name], dtype=dtype, rngs=nnx.Rngs(params=key))
    layer.bias[...] = jax.random.normal(jax.random.fold_in(key, 1), (D_OUT,))  # not zeros
    return layer


def ragged(key, lengths=LENGTHS, length=T, dtype=jnp.float32) -> sz.Seq:
    values = jax.random.normal(key, (len(lengths), length, D_IN), dtype)
    return sz.Seq.from_lengths(values, jnp.array(lengths))


def reference(layer: ConvTranspose1D, x: sz.Seq, keep_tail=False) -> list[np.ndarray]:
    """Per row, float64: input i adds x[i] @ kernel[k] to output i*s + k. Offline keeps the
    first n*s outputs; `keep_tail` also returns the K - s partial ones after them."""
    w = np.asarray(layer.kernel[...], np.float64)
    bias = np.asarray(layer.bias[...], np.float64)
    k, s, g = layer.kernel_size, layer.stride, layer.groups
    cin, cout = D_IN // g, D_OUT // g
    out = []
    for row in x.rows():
        row = row.astype(np.float64)
        n = row.shape[0]
        y = np.zeros((n * s + k, D_OUT)) + bias
        for i in range(n):
            for tap in range(k):
                for gi in range(g):
                    y[i * s + tap, gi * cout:(gi + 1) * cout] += (
                        row[i, gi * cin:(gi + 1) * cin] @ w[tap, :, gi * cout:(gi + 1) * cout])
        out.append(y[:n * s + (max(k - s, 0) if keep_tail else 0)])
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
    assert y.values.shape == (B, T * layer.stride, D_OUT)
    assert_rows_close(y.rows(), reference(layer, x))


@pytest.mark.parametrize("name", CONFIGS)
def test_stream_contract(name, key):
    layer = make(name, key)
    assert_stream_contract(layer, ragged(jax.random.fold_in(key, 2)), num_partitions=2)


def test_downsample_then_upsample_counts_frames_layer_by_layer(key):
    """stride 2 then upsample 2 gives floor(n / 2) * 2 frames (16 from 17), per the spec's stages."""
    from streamzoo import Serial
    from streamzoo.layers.conv import Conv1D

    model = Serial(Conv1D(D_IN, D_IN, 3, stride=2, lookahead=2, rngs=nnx.Rngs(0)),
                   ConvTranspose1D(D_IN, D_OUT, 4, stride=2, rngs=nnx.Rngs(1)))
    assert model.spec.offline_length(17) == 16 and model.spec.outputs_after(17) == 14
    assert_stream_contract(model, ragged(jax.random.fold_in(key, 3), lengths=(T, T - 3)),
                           num_partitions=1, checks=("partitions", "flush", "receptive_field"))


def test_receptive_field_is_exact(key):
    """Perturbing input i changes exactly outputs i*s .. i*s+K-1, i.e. i - anchor(j) in
    [(s-K)/s, (s-1)/s] as the spec declares, and none is held back (output_latency 0)."""
    layer = make("k5_s2_groups2", key)
    spec, s, k = layer.spec, layer.stride, layer.kernel_size
    assert spec.receptive_field == ((s - k) / s, (s - 1) / s)
    assert (spec.input_latency, spec.output_latency, spec.block_size) == (0, 0, 1)
    x = ragged(jax.random.fold_in(key, 2), lengths=(T,))
    y0 = np.asarray(_offline(layer, x).values[0])
    i = 5
    bumped = x.replace(values=x.values.at[0, i].add(jax.random.normal(key, (D_IN,))))
    diff = np.abs(np.asarray(_offline(layer, bumped).values[0]) - y0).max(-1)
    changed = np.nonzero(diff > 1e-6)[0]
    np.testing.assert_array_equal(changed, np.arange(i * s, i * s + k))
    for j in changed:
        assert spec.receptive_field[0] <= i - float(spec.anchor(int(j))) <= spec.receptive_field[1]


@pytest.mark.parametrize("name", ["k5_s2_groups2", "k3_s3"])
def test_overlap_tail_in_carry(name, key):
    """After each step the carry holds the K - s partial outputs that later inputs add to;
    rows with random holes (out of step with each other) stay exact."""
    layer = make(name, key)
    x = ragged(jax.random.fold_in(key, 2), lengths=(T,) * B)
    holes = jax.random.bernoulli(jax.random.fold_in(key, 3), 0.35, (B, T))
    x = sz.Seq(x.values, x.mask & ~holes)
    carry, outs, start = layer.init_carry(B), [], 0
    for size in [1, 3, 2, 4, 1, 5]:
        carry, y = _step(layer, carry, x.time_slice(start, start + size))
        outs.append(y)
        start += size
        done = sz.Seq(x.values[:, :start], x.mask[:, :start])
        want = reference(layer, done, keep_tail=True)
        open_frames = layer.kernel_size - layer.stride
        tails = [np.asarray(carry.tail[b, :open_frames]) + np.asarray(layer.bias[...])
                 for b in range(B)]
        assert_rows_close(tails, [w[len(w) - open_frames:] for w in want])
    got = sz.Seq.concatenate(outs).compacted().rows()
    assert_rows_close(got, reference(layer, x))


def test_long_run(key):
    layer = make("k5_s2_groups2", key)
    x = ragged(jax.random.fold_in(key, 2), lengths=(64, 61, 40), length=64)
    _, got = sz.stream(layer, x, 4)
    assert_rows_close(got.rows(), reference(layer, x))


def test_bfloat16(key):
    layer = make("k4_s2", key, dtype=jnp.bfloat16)
    x = ragged(jax.random.fold_in(key, 2), dtype=jnp.bfloat16)
    offline = _offline(layer, x)
    assert offline.dtype == jnp.bfloat16
    carry, streamed = sz.stream(layer, x, [1, 3, 4, 8], carry=layer.init_carry(B, jnp.bfloat16))
    assert carry.tail.dtype == jnp.float32  # partial sums stay float32
    assert streamed.dtype == jnp.bfloat16
    assert_rows_close(streamed.rows(), offline.rows(), tol=2e-2)
    assert_rows_close(offline.rows(), reference(layer, x), tol=1e-1)


def test_bad_input(key):
    layer = make("k4_s2", key)
    x = ragged(jax.random.fold_in(key, 2))
    with pytest.raises(ValueError, match=r"x: expected feature shape \(4,\), got \(3,\)"):
        layer(sz.Seq.full(jax.random.normal(key, (B, T, D_IN - 1))))
    with pytest.raises(ValueError, match="x: expected values of rank 3"):
        layer.step(layer.init_carry(B), sz.Seq(jax.random.normal(key, (B, T, D_IN, 1)),
                                               jnp.ones((B, T), bool)))
    with pytest.raises(ValueError, match=r"carry.*expected shape \(3, 2, 8\) for batch size 3"):
        layer.step(layer.init_carry(B - 1), x)
    with pytest.raises(ValueError, match="stride: expected a positive int, got 0"):
        ConvTranspose1D(D_IN, D_OUT, 4, stride=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="groups: expected a divisor"):
        ConvTranspose1D(D_IN, 6, 4, stride=2, groups=4, rngs=nnx.Rngs(0))


def test_block_size_is_one():
    """Upsampling takes any chunk length (block_size 1), so there is no 'T not a multiple of
    block_size' error to raise; a zero-length step is a no-op."""
    layer = ConvTranspose1D(D_IN, D_OUT, 4, stride=2, rngs=nnx.Rngs(0))
    carry = layer.init_carry(B)
    x = sz.Seq.full(jax.random.normal(jax.random.key(3), (B, 1, D_IN)))
    carry, y = layer.step(carry, x)
    assert y.values.shape == (B, 2, D_OUT) and bool(y.mask.all())
    same, empty = layer.step(carry, sz.Seq.empty(B, (D_IN,)))
    assert empty.values.shape == (B, 0, D_OUT)
    np.testing.assert_array_equal(np.asarray(same.tail), np.asarray(carry.tail))
