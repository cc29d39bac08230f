"""Streaming a trained *non-causal* convolution stack (Caillon & Esling 2022, "Streamable
Neural Audio Synthesis With Non-Causal Convolutions").

A non-causal conv reads `padding` frames before and some frames after each output. It is
streamed as a causal conv whose output is delayed: with a cache of past input it computes,
once input frame `p + L` has arrived, the output it would have given at p. In streamzoo that
is exactly `Conv1D(..., lookahead=L)` with the same weights: it holds back L/stride outputs
(`spec.output_latency`) and `flush` emits them at the end of the stream (computed with the
zeros the offline conv pads with). Delays add up along a stack, and parallel branches with
different delays are re-aligned by delaying the faster branches: `Residual` (core) delays its
skip path, `AlignedSum` here delays each branch to the slowest one. The converted stack's
output is the offline non-causal output delayed by `spec.output_latency` frames, frame for
frame, and ends with the same frames after `flush`.

Offline (training) modules: `NonCausalConv1D`, `NonCausalSequential`, `NonCausalResidual`,
`NonCausalParallel`; frame-wise StreamLayers (activations, norms) may sit among them.
`to_streaming(module)` converts, sharing the parameters.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.combinators import Residual, Serial
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer, batch_size_of
from streamzoo.layers.conv import Conv1D, check_groups, check_positive_int, conv_params

_DIMS = ("NWC", "WIO", "NWC")


# --------------------------------------------------------------------------- offline modules
class NonCausalConv1D(nnx.Module):
    """Offline non-causal 1-D conv: output j reads `x[j*stride - padding + m*dilation]`,
    m = 0..K-1, with zeros outside a row's valid frames; `floor(n / stride)` outputs for n
    valid inputs. Default padding `(K-1)*dilation // 2` ("same" for stride 1).

    Streamable (by `to_streaming`) when the frames it reads past its block's end,
    `lookahead = (K-1)*dilation - padding - (stride-1)`, is a non-negative multiple of stride.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
                 dilation: int = 1, groups: int = 1, padding: int | None = None,
                 use_bias: bool = True, rngs: nnx.Rngs):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.stride = check_positive_int("stride", stride)
        self.dilation = check_positive_int("dilation", dilation)
        self.groups = check_groups(in_features, out_features, groups)
        span = (kernel_size - 1) * dilation
        padding = span // 2 if padding is None else padding
        if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or not 0 <= padding <= span:
            raise ValueError(f"padding: expected an int in 0..(kernel_size-1)*dilation={span}, "
                             f"got {padding!r}")
        self.padding = int(padding)
        self.kernel, self.bias = conv_params(rngs, kernel_size, in_features, out_features, groups,
                                             use_bias)

    @property
    def span(self) -> int:
        return (self.kernel_size - 1) * self.dilation

    @property
    def lookahead(self) -> int:
        """Input frames read after the last frame of the output's stride block."""
        return self.span - self.padding - (self.stride - 1)

    def __call__(self, x: Seq) -> Seq:
        _check_seq(x, self.in_features)
        x = x.compacted()
        s, p = self.stride, self.padding
        n_out = x.length // s
        dtype = x.dtype
        if n_out == 0:
            return Seq.empty(x.batch_size, (self.out_features,), dtype)
        right = max(0, (n_out - 1) * s - p + self.span + 1 - x.length)
        v = jnp.pad(x.values, ((0, 0), (p, right), (0, 0)))
        y = jax.lax.conv_general_dilated(
            v, self.kernel[...].astype(dtype), window_strides=(s,), padding="VALID",
            rhs_dilation=(self.dilation,), dimension_numbers=_DIMS,
            feature_group_count=self.groups)[:, :n_out]
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        mask = jnp.arange(n_out)[None, :] < (x.lengths() // s)[:, None]
        return Seq(y, mask, compact=True).masked()

    def streaming(self) -> Conv1D:
        """The equivalent `Conv1D` with look-ahead (same parameter arrays)."""
        look = self.lookahead
        if look < 0 or look % self.stride:
            raise ValueError(
                f"padding: a stride-{self.stride} conv with kernel_size={self.kernel_size}, "
                f"dilation={self.dilation} and padding={self.padding} reads {look} frames past "
                f"its stride block, which must be a non-negative multiple of the stride to "
                f"stream it on the stride grid; use padding = (kernel_size-1)*dilation - "
                f"(stride-1) - m*stride for some m >= 0")
        conv = Conv1D(self.in_features, self.out_features, self.kernel_size, stride=self.stride,
                      dilation=self.dilation, groups=self.groups, lookahead=look,
                      use_bias=self.bias is not None, rngs=nnx.Rngs(0))
        conv.kernel = self.kernel
        if self.bias is not None:
            conv.bias = self.bias
        return conv


class NonCausalSequential(nnx.Module):
    """Layers one after another (offline)."""

    def __init__(self, *layers):
        if not layers:
            raise ValueError("layers: expected at least one layer")
        self.layers = nnx.List(list(layers))

    def __call__(self, x: Seq) -> Seq:
        for layer in self.layers:
            x = layer(x)
        return x


class NonCausalResidual(nnx.Module):
    """`x + inner(x)` (offline); `inner` keeps the frame rate and feature size."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x: Seq) -> Seq:
        y = self.inner(x)
        x = x.compacted()
        return y.replace(values=y.values + x.values.astype(y.dtype)).masked()


class NonCausalParallel(nnx.Module):
    """`sum_i branches[i](x)` (offline), e.g. HiFi-GAN's multi-receptive-field fusion."""

    def __init__(self, *branches):
        if len(branches) < 1:
            raise ValueError("branches: expected at least one branch")
        self.branches = nnx.List(list(branches))

    def __call__(self, x: Seq) -> Seq:
        outs = [b(x) for b in self.branches]
        return outs[0].replace(values=sum(o.values for o in outs)).masked()


def _check_seq(x, features):
    if not isinstance(x, Seq):
        raise ValueError(f"x: expected a streamzoo.Seq, got {type(x).__name__}")
    if x.values.ndim != 3 or x.values.shape[-1] != features:
        raise ValueError(f"x: expected values of shape [B, T, {features}], got {tuple(x.values.shape)}")


# ---------------------------------------------------------------------------- conversion
def to_streaming(module) -> StreamLayer:
    """The streaming equivalent of an offline non-causal stack (parameters shared).

    Its offline call equals `module(x)`; streamed, it emits the same frames delayed by
    `spec.output_latency` (per row: after n inputs, the first `floor(n*ratio) - latency`
    outputs), and `flush` emits the rest.
    """
    if isinstance(module, NonCausalConv1D):
        return module.streaming()
    if isinstance(module, NonCausalSequential):
        layers, spec = [], None
        for layer in module.layers:
            layer = to_streaming(layer)
            # A delay must be a whole number of frames after a stride (the paper adds delay
            # before strided convs): pad the accumulated latency to a multiple of the stride.
            stride = layer.spec.block_size
            if spec is not None and spec.output_latency % stride:
                delay = Delay(layer.in_features, (-spec.output_latency) % stride)
                layers.append(delay)
                spec = spec.then(delay.spec)
            layers.append(layer)
            spec = layer.spec if spec is None else spec.then(layer.spec)
        return layers[0] if len(layers) == 1 else Serial(*layers)
    if isinstance(module, NonCausalResidual):
        return Residual(to_streaming(module.inner))
    if isinstance(module, NonCausalParallel):
        branches = [to_streaming(b) for b in module.branches]
        return branches[0] if len(branches) == 1 else AlignedSum(*branches)
    if isinstance(module, StreamLayer):
        return module
    raise ValueError(f"module: cannot stream a {type(module).__name__}; expected NonCausalConv1D, "
                     "NonCausalSequential, NonCausalResidual, NonCausalParallel or a StreamLayer")


# ---------------------------------------------------------------------------------- Delay
@struct.dataclass
class DelayCarry:
    held: jax.Array   # [B, frames, F] the newest committed frames, not yet emitted
    count: jax.Array  # [B] int32 valid frames in `held`


class Delay(StreamLayer):
    """Holds back the newest `frames` frames (emitted by `flush`); offline, the identity.

    It adds `frames` of output latency and no look-ahead: used to make an accumulated delay a
    whole number of frames before a strided layer, and to align parallel branches.
    """

    def __init__(self, features: int, frames: int):
        self.in_features = self.out_features = check_positive_int("features", features)
        self.frames = check_positive_int("frames", frames)

    @property
    def spec(self):
        return StreamSpec(output_latency=self.frames)

    def _init_carry(self, batch_size, dtype):
        return DelayCarry(jnp.zeros((batch_size, self.frames, self.in_features), dtype or jnp.float32),
                          jnp.zeros((batch_size,), jnp.int32))

    def _forward(self, x: Seq) -> Seq:
        return x

    def _step(self, carry: DelayCarry, x: Seq):
        y, held, count = _fifo(carry.held, carry.count, x, self.frames, x.length, final=False)
        return DelayCarry(held, count), y

    def _flush(self, carry: DelayCarry, batch_size: int):
        empty = Seq.empty(batch_size, (self.in_features,), carry.held.dtype)
        y, _, _ = _fifo(carry.held, carry.count, empty, self.frames, self.frames, final=True)
        return carry, y


# ----------------------------------------------------------------------------- AlignedSum
@struct.dataclass
class AlignedSumCarry:
    branches: tuple
    held: tuple   # per branch: [B, D_i, F] frames waiting for the slowest branch (None if D_i = 0)
    count: tuple  # per branch: [B] int32 valid frames in `held` (None if D_i = 0)

    @property
    def batch_size(self):
        return batch_size_of(self.branches[0])


class AlignedSum(StreamLayer):
    """`sum_i branches[i](x)` of branches with different latencies, streamed in step.

    Branch i (latency L_i) runs ahead of the slowest branch (L_max) by `D_i = L_max - L_i`
    frames; its outputs wait in a per-row FIFO of D_i frames in the carry, so that the frames
    added together are the same output frames. Branches keep the frame rate (output_ratio 1).
    """

    def __init__(self, *branches: StreamLayer):
        if len(branches) < 2:
            raise ValueError(f"branches: expected at least two branches, got {len(branches)}")
        first = branches[0]
        for i, b in enumerate(branches):
            if b.spec.output_ratio != 1:
                raise ValueError(f"branches[{i}]: expected output_ratio 1, got {b.spec.output_ratio}")
            if (b.input_frame_shape, b.output_frame_shape) != (first.input_frame_shape,
                                                               first.output_frame_shape):
                raise ValueError(
                    f"branches[{i}]: expected feature shapes {first.input_frame_shape} -> "
                    f"{first.output_frame_shape} like branches[0], got {b.input_frame_shape} -> "
                    f"{b.output_frame_shape}")
        self.branches = nnx.List(list(branches))
        self.in_features, self.out_features = first.in_features, first.out_features
        latencies = [b.spec.output_latency for b in branches]
        self.latency = max(latencies)
        self.delays = tuple(self.latency - l for l in latencies)
        slowest = branches[latencies.index(self.latency)].spec
        past = min(b.spec.receptive_field[0] for b in branches)
        future = max(b.spec.receptive_field[1] for b in branches)
        block = math.lcm(*[b.spec.block_size for b in branches])
        self._spec = StreamSpec(block_size=block, output_ratio=1,
                                input_latency=max(b.spec.input_latency for b in branches),
                                output_latency=self.latency, receptive_field=(past, future),
                                stages=((slowest.output_ratio, self.latency),))

    @property
    def spec(self):
        return self._spec

    def _init_carry(self, batch_size, dtype):
        held, count = [], []
        for d in self.delays:
            if d:
                held.append(jnp.zeros((batch_size, d, *self.output_frame_shape), dtype or jnp.float32))
                count.append(jnp.zeros((batch_size,), jnp.int32))
            else:
                held.append(None)
                count.append(None)
        return AlignedSumCarry(tuple(b.init_carry(batch_size, dtype) for b in self.branches),
                               tuple(held), tuple(count))

    def _forward(self, x: Seq) -> Seq:
        outs = [b(x) for b in self.branches]
        return outs[0].replace(values=sum(o.values for o in outs)).masked()

    def _combine(self, ys, held, count, length, final):
        total, new_held, new_count = None, [], []
        for y, h, c, d in zip(ys, held, count, self.delays):
            y = y.compacted()
            if d:
                y, h, c = _fifo(h, c, y, d, length, final)
            elif y.length != length:
                y = Seq(_fit(y.values, length), _fit(y.mask, length), compact=True)
            total = y if total is None else total.replace(values=total.values + y.values)
            new_held.append(h)
            new_count.append(c)
        return total.masked(), tuple(new_held), tuple(new_count)

    def _step(self, carry: AlignedSumCarry, x: Seq):
        branches, ys = [], []
        for b, c in zip(self.branches, carry.branches):
            c, y = b.step(c, x)
            branches.append(c)
            ys.append(y)
        y, held, count = self._combine(ys, carry.held, carry.count, x.length, final=False)
        return AlignedSumCarry(tuple(branches), held, count), y

    def _flush(self, carry: AlignedSumCarry, batch_size: int):
        ys = [b.flush(c)[1] for b, c in zip(self.branches, carry.branches)]
        y, _, _ = self._combine(ys, carry.held, carry.count, self.latency, final=True)
        return carry, y

    def _reset_rows(self, carry, rows, batch_size):
        fresh = self.init_carry(batch_size)
        held = tuple(None if h is None else jnp.where(rows[:, None, None], f.astype(h.dtype), h)
                     for h, f in zip(carry.held, fresh.held))
        count = tuple(None if c is None else jnp.where(rows, 0, c) for c in carry.count)
        return AlignedSumCarry(tuple(b.reset_rows(c, rows) for b, c in zip(self.branches, carry.branches)),
                               held, count)


def _fit(a, length):
    """a `[B, T, ...]` cut or zero-padded to `length` frames."""
    if a.shape[1] >= length:
        return a[:, :length]
    return jnp.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2))


def _fifo(held, count, y: Seq, delay: int, length: int, final: bool):
    """Append y's valid frames to each row's `count` held frames and emit the oldest ones,
    keeping the newest `delay` back (all of them when `final`). Returns
    `(emitted Seq [B, length], held, count)`."""
    n = y.lengths()
    total = count + n
    emit = total if final else jnp.maximum(total - delay, 0)
    window = jnp.concatenate([held.astype(y.dtype), y.values], axis=1)  # [B, delay + T, ...]

    def combined(m):  # index in `window` of the row's m-th held-then-new frame
        return jnp.where(m < count[:, None], m, delay + m - count[:, None])

    m = jnp.arange(length)[None, :]
    out = Seq(_gather(window, combined(m)), m < emit[:, None], compact=True).masked()
    j = emit[:, None] + jnp.arange(delay)[None, :]
    keep = jnp.arange(delay)[None, :] < (total - emit)[:, None]
    new_held = jnp.where(keep[..., None], _gather(window, combined(j)), 0).astype(held.dtype)
    return out, new_held, total - emit


def _gather(values, idx):
    """Per row b: `values[b, idx[b]]` along time (indices clipped)."""
    idx = jnp.clip(idx, 0, values.shape[1] - 1)
    return jnp.take_along_axis(values, idx.reshape(idx.shape + (1,) * (values.ndim - 2)), axis=1)
