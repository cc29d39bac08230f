"""Causal transposed 1-D convolution over time (`ConvTranspose1D`): upsampling by `stride`.

Input frame i adds `x[i] @ kernel[k]` to output frame `i*stride + k` for k = 0..K-1. After n
input frames, outputs `0 .. n*stride - 1` are final (no later input reaches them) and are
emitted at once, so the layer has no latency. The overlap tail (outputs `n*stride ..
n*stride + K - stride - 1`, which later inputs still add to) is kept, as float32 partial sums,
in the carry.

Offline on n frames returns exactly `n*stride` frames, like streaming: the partial tail beyond
them is dropped (it is what the carry would hold), so `output_ratio = stride` holds exactly.

The conv runs polyphase: output phase r of frame i*stride + r is a stride-1 causal conv of x
with taps `kernel[r], kernel[stride + r], ...`, so all phases are one conv with
`stride * out_features` channels and no multiplications by inserted zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.core.checks import check_positive_int
from streamzoo.core.frames import take_frames
from streamzoo.layers.conv import check_groups, conv_params

_DIMS = ("NWC", "WIO", "NWC")


@struct.dataclass
class ConvTransposeCarry:
    tail: jax.Array  # [B, max(K - stride, 1), out_features] f32 partial sums of the next outputs


class ConvTranspose1D(StreamLayer):
    """Causal transposed conv: `[B, T, in_features] -> [B, T * stride, out_features]`.

    Parameters are float32 (`kernel [K, in_features // groups, out_features]`); the conv runs
    in `dtype` (default: the input's dtype) with float32 accumulation.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int,
                 groups: int = 1, use_bias: bool = True, dtype=None, rngs: nnx.Rngs):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.stride = check_positive_int("stride", stride)
        self.groups = check_groups(in_features, out_features, groups)
        self.dtype = dtype
        self.kernel, self.bias = conv_params(rngs, kernel_size, in_features, out_features, groups,
                                             use_bias)

    @property
    def tail_size(self) -> int:
        """Output frames still open after each input: K - stride (at least one slot is kept,
        always zero when K <= stride, so that no carry leaf is empty)."""
        return max(self.kernel_size - self.stride, 1)

    @property
    def spec(self) -> StreamSpec:
        # Input i reaches outputs j with i*s <= j <= i*s + K - 1; with anchor(j) = (j+1)/s - 1
        # that is (s - K)/s <= i - anchor(j) <= (s - 1)/s.
        s, k = self.stride, self.kernel_size
        return StreamSpec(block_size=1, output_ratio=s,
                          receptive_field=((s - k) / s, (s - 1) / s))

    def _init_carry(self, batch_size, dtype):
        return ConvTransposeCarry(
            jnp.zeros((batch_size, self.tail_size, self.out_features), jnp.float32))

    def _polyphase_kernel(self, dtype) -> jax.Array:
        """`[taps, in/groups, groups * s * out/groups]`, time-reversed for a correlation.

        Tap m, phase r of output channel (group g, o) is `kernel[m*s + r, :, g*out/groups + o]`;
        channels are group-major as `feature_group_count` requires.
        """
        s, g = self.stride, self.groups
        taps = math.ceil(self.kernel_size / s)
        w = self.kernel[...]
        w = jnp.pad(w, ((0, taps * s - self.kernel_size), (0, 0), (0, 0)))
        cin, og = w.shape[1], self.out_features // g
        w = w.reshape(taps, s, cin, g, og).transpose(0, 2, 3, 1, 4).reshape(taps, cin, g * s * og)
        return w[::-1].astype(dtype)

    def _contributions(self, v: jax.Array) -> jax.Array:
        """Sum over the T frames of v of their contributions: `[B, T*s + tail_size, out]` f32."""
        s, g = self.stride, self.groups
        w = self._polyphase_kernel(v.dtype)
        taps = w.shape[0]
        y = jax.lax.conv_general_dilated(
            v, w, window_strides=(1,), padding=[(taps - 1, taps - 1)], dimension_numbers=_DIMS,
            feature_group_count=g, preferred_element_type=jnp.float32)
        b, frames = y.shape[:2]  # frames = T + taps - 1
        og = self.out_features // g
        y = y.reshape(b, frames, g, s, og).transpose(0, 1, 3, 2, 4).reshape(b, frames * s, g * og)
        need = v.shape[1] * s + self.tail_size
        if y.shape[1] < need:
            y = jnp.pad(y, ((0, 0), (0, need - y.shape[1]), (0, 0)))
        return y[:, :need]

    def _run(self, tail: jax.Array, x: Seq):
        """New tail and the `T*s` outputs of x (row b's first `n_b*s` valid) after `tail`."""
        dtype = self.dtype or x.dtype
        s, t = self.stride, x.length
        acc = self._contributions(x.values.astype(dtype))
        acc = acc.at[:, :self.tail_size].add(tail)
        lengths = x.lengths()
        new_tail = take_frames(acc, lengths * s, self.tail_size)
        y = acc[:, :t * s]
        if self.bias is not None:
            y = y + self.bias[...]
        mask = jnp.arange(t * s)[None, :] < (lengths * s)[:, None]
        return new_tail, Seq(y.astype(dtype), mask, compact=True).masked()

    def _forward(self, x: Seq) -> Seq:
        return self._run(self._init_carry(x.batch_size, None).tail, x)[1]

    def _step(self, carry: ConvTransposeCarry, x: Seq):
        tail, y = self._run(carry.tail, x)
        return ConvTransposeCarry(tail.astype(carry.tail.dtype)), y
