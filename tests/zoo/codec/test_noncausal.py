"""Streaming conversion of a trained non-causal conv stack (Caillon & Esling 2022): the
converted stack's stream is the offline non-causal output delayed by the reported latency,
with residual and parallel branches delay-aligned and a delay inserted before a stride."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.codec import noncausal as nc
from streamzoo.zoo.codec.model import Activation

LENGTHS = (24, 17, 9)


def stack(key) -> nc.NonCausalSequential:
    r = nnx.Rngs(params=key)
    return nc.NonCausalSequential(
        nc.NonCausalConv1D(2, 4, 3, rngs=r), Activation(4),                    # latency 1
        nc.NonCausalResidual(nc.NonCausalSequential(                           # latency 4
            nc.NonCausalConv1D(4, 4, 5, dilation=2, rngs=r), Activation(4))),
        nc.NonCausalParallel(                                                  # 1 vs 3 + 1
            nc.NonCausalConv1D(4, 4, 3, rngs=r),
            nc.NonCausalSequential(nc.NonCausalConv1D(4, 4, 7, rngs=r),
                                   nc.NonCausalConv1D(4, 4, 3, rngs=r))),
        nc.NonCausalConv1D(4, 3, 4, stride=2, padding=0, rngs=r))              # look-ahead 2


def reference(model: nc.NonCausalSequential, x: sz.Seq) -> list[np.ndarray]:
    """The offline non-causal stack in float64 NumPy, row by row (zero padding both ends)."""
    def conv(layer, h):
        w = np.asarray(layer.kernel[...], np.float64)
        b = np.asarray(layer.bias[...], np.float64)
        n, out = h.shape[0], []
        for j in range(n // layer.stride):
            y = b.copy()
            for m in range(layer.kernel_size):
                i = j * layer.stride - layer.padding + m * layer.dilation
                if 0 <= i < n:
                    y = y + h[i] @ w[m]
            out.append(y)
        return np.array(out).reshape(-1, layer.out_features)

    def run(module, h):
        if isinstance(module, nc.NonCausalConv1D):
            return conv(module, h)
        if isinstance(module, nc.NonCausalSequential):
            for layer in module.layers:
                h = run(layer, h)
            return h
        if isinstance(module, nc.NonCausalResidual):
            return h + run(module.inner, h)
        if isinstance(module, nc.NonCausalParallel):
            return sum(run(b, h) for b in module.branches)
        return np.where(h > 0, h, np.expm1(h))  # ELU

    return [run(model, row.astype(np.float64)) for row in x.rows()]


def ragged(key, lengths=LENGTHS):
    return sz.Seq.from_lengths(jax.random.normal(key, (len(lengths), max(lengths), 2)),
                               jnp.asarray(lengths))


def test_conversion_structure_and_latency(key):
    model = stack(key)
    streaming = nc.to_streaming(model)
    kinds = [type(l).__name__ for l in streaming.layers]
    assert kinds == ["Conv1D", "Activation", "Residual", "AlignedSum", "Delay", "Conv1D"]
    # 1 + 4 + 4 = 9 frames, one more frame of delay to make 10 (a multiple of the stride),
    # then the strided conv's look-ahead 2: (10 + 2) / 2 = 6 output frames.
    assert streaming.layers[4].frames == 1
    assert streaming.spec.output_latency == 6 and streaming.spec.output_ratio == 0.5
    assert streaming.layers[3].delays == (3, 0)  # the fast branch waits for the slow one
    # Parameters are shared, not copied.
    assert streaming.layers[0].kernel is model.layers[0].kernel


def test_stream_is_offline_delayed_by_latency(key):
    model = stack(key)
    streaming = nc.to_streaming(model)
    x = ragged(jax.random.fold_in(key, 1))
    want = reference(model, x)
    offline = model(x).rows()
    for o, w in zip(offline, want):
        np.testing.assert_allclose(o, w, atol=1e-4, rtol=1e-4)
    latency = streaming.spec.output_latency
    carry, before = sz.stream(streaming, x, [2, 6, 4, 2, 10], with_flush=False)
    for got, w, n in zip(before.rows(), offline, LENGTHS):
        # After n inputs the stream has given the first n // 2 - latency offline frames.
        assert len(got) == max(0, n // 2 - latency)
        np.testing.assert_allclose(got, w[:len(got)], atol=1e-5, rtol=1e-5)
    _, tail = streaming.flush(carry)
    for got, w, b in zip(tail.rows(), offline, before.rows()):
        np.testing.assert_allclose(got, w[len(b):], atol=1e-5, rtol=1e-5)


def test_stream_contract(key):
    assert_stream_contract(nc.to_streaming(stack(key)), ragged(jax.random.fold_in(key, 1)),
                           num_partitions=1)


def test_aligned_sum_and_delay_contract(key):
    r = nnx.Rngs(params=key)
    model = nc.NonCausalParallel(nc.NonCausalConv1D(2, 2, 5, rngs=r),
                                 nc.NonCausalConv1D(2, 2, 3, padding=0, rngs=r),   # look-ahead 2
                                 nc.NonCausalConv1D(2, 2, 3, padding=2, rngs=r))   # causal
    streaming = nc.to_streaming(model)
    assert isinstance(streaming, nc.AlignedSum) and streaming.delays == (0, 0, 2)
    x = ragged(jax.random.fold_in(key, 1))
    for got, want in zip(streaming(x).rows(), model(x).rows()):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert_stream_contract(streaming, x, num_partitions=1,
                           checks=("partitions", "flush", "batch", "reset_rows", "long"))
    assert_stream_contract(nc.Delay(2, 3), x, num_partitions=1,
                           checks=("partitions", "flush", "exec_mask", "reset_rows"))


def test_bad_input(key):
    r = nnx.Rngs(params=key)
    with pytest.raises(ValueError, match="padding"):
        nc.NonCausalConv1D(2, 2, 3, padding=3, rngs=r)
    with pytest.raises(ValueError, match="padding: a stride-2 conv"):
        nc.NonCausalConv1D(2, 2, 4, stride=2, padding=1, rngs=r).streaming()
    with pytest.raises(ValueError, match="module: cannot stream"):
        nc.to_streaming(nnx.Linear(2, 2, rngs=r))
    with pytest.raises(ValueError, match="branches"):
        nc.AlignedSum(nc.NonCausalConv1D(2, 2, 3, rngs=r).streaming())
    with pytest.raises(ValueError, match="branches\\[1\\]"):
        nc.AlignedSum(nc.NonCausalConv1D(2, 2, 3, rngs=r).streaming(),
                      nc.NonCausalConv1D(2, 3, 3, rngs=r).streaming())
    with pytest.raises(ValueError, match="x: expected values of shape"):
        nc.NonCausalConv1D(2, 2, 3, rngs=r)(ragged(key).map(lambda v: v[..., :1]))
    with pytest.raises(ValueError, match="frames"):
        nc.Delay(2, 0)
