"""causal_depthwise_conv: the jnp reference against a float64 loop; the Pallas kernel (interpret
mode, the Mosaic GPU schedule; TPU interpret mode, the TPU schedule) against the reference on
fresh random inputs with NaN in every invalid frame; chunked steps == offline with rows out of
step; gradients; lowering for cuda (Mosaic GPU) and tpu from the CPU; Conv1D wiring; bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.layers.conv import Conv1D
from streamzoo.pallas_kernels import causal_depthwise_conv as dw
from tests.pallas_kernels.common import TOL, call

# (B, T, C, K, dilation, S, dtype, lengths, block_t): S > span, K = 1, several time blocks.
CASES = {
    "f32_k3_d2_S5_3blocks": (3, 20, 16, 3, 2, 5, jnp.float32, (20, 13, 0), 8),
    "bf16_k4_S3": (2, 12, 24, 4, 1, 3, jnp.bfloat16, (12, 5), None),
    "f32_k1": (2, 9, 8, 1, 1, 1, jnp.float32, (4, 9), 8),
}


@functools.partial(jax.jit, static_argnums=1)
def inputs(key, case):
    batch, length, channels, taps, dilation, size, dtype, lengths, _ = case
    k = jax.random.split(key, 4)
    lengths = jnp.array(lengths, jnp.int32)
    x = jax.random.normal(k[0], (batch, length, channels), dtype)
    invalid = jnp.arange(length)[None, :, None] >= lengths[:, None, None]
    x = jnp.where(invalid, jnp.nan, x).astype(dtype)  # NaN must never reach valid outputs
    state = jax.random.normal(k[1], (batch, size, channels), dtype)
    kernel = jax.random.normal(k[2], (taps, channels), jnp.float32)
    bias = jax.random.normal(k[3], (channels,), jnp.float32)
    return x, state, kernel, bias, lengths


def numpy_conv(x, state, kernel, bias, dilation, lengths):
    """float64 loop: row b's valid outputs and its last S frames of state ++ valid x."""
    x, state = np.asarray(x, np.float64), np.asarray(state, np.float64)
    kernel, bias = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
    taps, size = kernel.shape[0], state.shape[1]
    ys, states = [], []
    for b, n in enumerate(np.asarray(lengths)):
        window = np.concatenate([state[b], x[b, :n]])
        y = [bias + sum(kernel[k] * window[size + t - (taps - 1 - k) * dilation]
                        for k in range(taps)) for t in range(n)]
        ys.append(np.array(y).reshape(n, x.shape[-1]))
        states.append(window[n:n + size])
    return ys, states


def assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    np.testing.assert_allclose(got, want, atol=TOL[dtype] * scale, rtol=0, err_msg=what)


@pytest.fixture(scope="module")
def cases():
    return {name: inputs(jax.random.key(i + 11), case)
            for i, (name, case) in enumerate(CASES.items())}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_float64_loop(cases, name):
    x, state, kernel, bias, lengths = cases[name]
    dtype, dilation = CASES[name][6], CASES[name][4]
    y, new_state = call(dw.causal_depthwise_conv, x, state, kernel, bias, dilation=dilation,
                                            lengths=lengths, impl="xla")
    # The loop sees the same rounded inputs (kernel rounded to the compute dtype, as Conv1D).
    ys, states = numpy_conv(x.astype(jnp.float32), state.astype(jnp.float32),
                            kernel.astype(dtype).astype(jnp.float32),
                            bias.astype(dtype).astype(jnp.float32), dilation, lengths)
    assert bool(jnp.isfinite(y).all())
    for b, n in enumerate(np.asarray(lengths)):
        assert_close(y[b, :n], ys[b], dtype, f"row {b} y")
        assert not np.asarray(y[b, n:], np.float32).any(), "invalid frames must be zeros"
        assert_close(new_state[b], states[b], dtype, f"row {b} state")


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(cases, name):
    x, state, kernel, bias, lengths = cases[name]
    dtype, dilation, block_t = CASES[name][6], CASES[name][4], CASES[name][8]
    want = call(dw.causal_depthwise_conv, x, state, kernel, bias, dilation=dilation, lengths=lengths,
                                    impl="xla")
    got = jax.jit(functools.partial(dw.causal_depthwise_conv, dilation=dilation, impl="interpret",
                                    block_t=block_t))(x, state, kernel, bias, lengths=lengths)
    for g, w, what in zip(got, want, ("y", "new_state")):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        assert bool(jnp.isfinite(g.astype(jnp.float32)).all()), f"{what}: NaN leaked"
        assert_close(g, w, dtype, what)


def test_tpu_interpret_matches_reference(cases):
    """The TPU kernel (scalar-prefetched lengths, roll-based shifts) in the TPU simulator."""
    x, state, kernel, bias, lengths = cases["f32_k3_d2_S5_3blocks"]
    want = call(dw.causal_depthwise_conv, x, state, kernel, bias, dilation=2, lengths=lengths,
                                    impl="xla")
    got = call(dw.causal_depthwise_conv, x, state, kernel, bias, dilation=2, lengths=lengths,
                                   impl="tpu_interpret", block_t=8)
    for g, w, what in zip(got, want, ("y", "new_state")):
        assert_close(g, w, jnp.float32, what)


def test_chunked_steps_equal_offline(key):
    """Rows out of step: each chunk gives every row its own count of valid frames; threading
    the state through the chunks equals one offline call on each row's valid frames."""
    batch, channels, taps, dilation = 3, 16, 3, 2
    size = (taps - 1) * dilation
    k = jax.random.split(key, 3)
    kernel = jax.random.normal(k[0], (taps, channels))
    bias = jax.random.normal(k[1], (channels,))
    counts = np.array([[8, 3, 0], [5, 8, 8], [8, 0, 6]])  # chunk c gives row b counts[c, b]
    streams = jax.random.normal(k[2], (batch, counts.sum(0).max(), channels))
    step = jax.jit(functools.partial(dw.causal_depthwise_conv, dilation=dilation,
                                     impl="interpret", block_t=8))
    state = jnp.zeros((batch, size, channels))
    outs = [[] for _ in range(batch)]
    done = np.zeros(batch, int)
    for c in counts:
        chunk = np.full((batch, 8, channels), np.nan, np.float32)
        for b in range(batch):
            chunk[b, :c[b]] = streams[b, done[b]:done[b] + c[b]]
        y, state = step(jnp.asarray(chunk), state, kernel, bias, lengths=jnp.asarray(c))
        for b in range(batch):
            outs[b].append(np.asarray(y[b, :c[b]]))
        done += c
    lengths = jnp.asarray(done)
    offline, final = call(dw.causal_depthwise_conv, streams, None, kernel, bias, dilation=dilation,
                                              lengths=lengths, impl="xla")
    for b in range(batch):
        np.testing.assert_allclose(np.concatenate(outs[b]), offline[b, :done[b]], atol=1e-5)
    np.testing.assert_allclose(state, final, atol=1e-6)


def test_gradients_match_reference(cases):
    """custom_vjp: the Pallas forward with the reference's backward, w.r.t. every input."""
    x, state, kernel, bias, lengths = cases["f32_k3_d2_S5_3blocks"]
    x = jnp.nan_to_num(x)  # gradients at invalid frames are zero either way; keep them finite
    w_y = jax.random.normal(jax.random.key(5), x.shape)
    w_s = jax.random.normal(jax.random.key(6), state.shape)

    def loss(impl, *args):
        y, s = call(dw.causal_depthwise_conv, *args, dilation=2, lengths=lengths, impl=impl,
                    block_t=8)
        return jnp.sum(y * w_y) + jnp.sum(s * w_s)

    got = jax.jit(jax.grad(functools.partial(loss, "interpret"), argnums=(0, 1, 2, 3)))(
        x, state, kernel, bias)
    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2, 3))(x, state, kernel, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5)


def _lower(backend, platform, batch, length, channels, taps, dilation, size, dtype, **kw):
    args = (jax.ShapeDtypeStruct((batch, length, channels), dtype),
            jax.ShapeDtypeStruct((batch, size, channels), dtype),
            jax.ShapeDtypeStruct((taps, channels), jnp.float32),
            jax.ShapeDtypeStruct((channels,), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32))
    f = functools.partial(dw.pallas_forward, backend, dilation=dilation, **kw)
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("shape", [(2, 256, 256, 4, 1, 3, jnp.bfloat16),
                                   (3, 5, 128, 5, 2, 8, jnp.float32)], ids=["prefill_bf16", "step_f32"])
def test_mosaic_gpu_lowers_for_cuda(shape):
    """Mosaic GPU's Python lowering (layouts, SMEM budget, TMA block shapes) runs on the CPU."""
    text = _lower("mosaic_gpu", "cuda", *shape)
    assert "mosaic_gpu" in text


def test_tpu_lowers_for_tpu():
    text = _lower("tpu", "tpu", 2, 256, 256, 4, 1, 3, jnp.bfloat16)
    assert "tpu_custom_call" in text


def test_conv1d_impl_interpret_equals_xla(key):
    """Conv1D's depthwise case runs the kernel; offline and streamed outputs equal the XLA
    path's with the same parameters."""
    channels = 16
    k = jax.random.split(key, 3)
    layers = {impl: Conv1D(channels, channels, 3, dilation=2, groups=channels, impl=impl,
                           rngs=nnx.Rngs(params=k[0])) for impl in ("xla", "interpret")}
    layers["interpret"].bias[...] = layers["xla"].bias[...] = jax.random.normal(k[1], (channels,))
    x = sz.Seq.from_lengths(jax.random.normal(k[2], (3, 16, channels)), jnp.array([16, 11, 4]))
    want_off = layers["xla"](x)
    got_off = layers["interpret"](x)
    np.testing.assert_allclose(got_off.values, want_off.values, atol=1e-5)
    np.testing.assert_array_equal(got_off.mask, want_off.mask)
    for impl in layers:
        _, streamed = sz.stream(layers[impl], x, [5, 11])
        for got, want in zip(streamed.rows(), want_off.rows()):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=impl)


def test_conv1d_other_cases_keep_the_xla_path():
    layer = Conv1D(4, 4, 3, groups=4, lookahead=1, impl="interpret", rngs=nnx.Rngs(0))
    assert layer._fused_impl() is None  # look-ahead: not the kernel's case
    assert Conv1D(4, 8, 3, groups=4, impl="interpret", rngs=nnx.Rngs(0))._fused_impl() is None
    assert Conv1D(4, 4, 3, groups=4, rngs=nnx.Rngs(0))._fused_impl() is None  # auto on CPU
    with pytest.raises(ValueError, match="impl"):
        Conv1D(4, 4, 3, impl="cuda", rngs=nnx.Rngs(0))


def test_bad_input_raises():
    x = jnp.zeros((2, 8, 4))
    kernel = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="x: expected"):
        dw.causal_depthwise_conv(x[0], None, kernel)
    with pytest.raises(ValueError, match=r"kernel: expected shape \[K, 4\]"):
        dw.causal_depthwise_conv(x, None, jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="state: expected"):
        dw.causal_depthwise_conv(x, jnp.zeros((2, 1, 4)), kernel)  # S < span = 2
    with pytest.raises(ValueError, match="bias"):
        dw.causal_depthwise_conv(x, None, kernel, jnp.zeros((5,)))
    with pytest.raises(ValueError, match="lengths"):
        dw.causal_depthwise_conv(x, None, kernel, lengths=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="dilation"):
        dw.causal_depthwise_conv(x, None, kernel, dilation=0)
    with pytest.raises(ValueError, match="impl"):
        dw.causal_depthwise_conv(x, None, kernel, impl="mosaic_gpu")  # no GPU here
    with pytest.raises(ValueError, match="block_c"):
        dw.pallas_forward("mosaic_gpu", x, jnp.zeros((2, 2, 4)), kernel, jnp.zeros((4,)),
                          jnp.zeros((2,), jnp.int32), block_c=64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("taps,dilation,block_t", [(2, 3, 8), (5, 1, 16), (4, 2, 24)])
def test_sweep_interpret_matches_reference(key, dtype, taps, dilation, block_t):
    size = max((taps - 1) * dilation, 1) + 2
    case = (3, 40, 32, taps, dilation, size, dtype, (40, 23, 1), block_t)
    x, state, kernel, bias, lengths = inputs(key, case)
    want = call(dw.causal_depthwise_conv, x, state, kernel, bias, dilation=dilation, lengths=lengths,
                                    impl="xla")
    got = call(dw.causal_depthwise_conv, x, state, kernel, bias, dilation=dilation, lengths=lengths,
                                   impl="interpret", block_t=block_t)
    for g, w in zip(got, want):
        assert_close(g, w, dtype, "sweep")
