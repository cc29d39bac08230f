"""Causal 1-D convolution over time (`Conv1D`): strided, dilated, grouped/depthwise, with an
optional bounded look-ahead.

Output frame j of a stride-s conv belongs to the input block `j*s .. (j+1)*s - 1`. With
`lookahead = L` it reads the K taps ending at input frame `p_j = (j+1)*s - 1 + L`:
`p_j - (K-1)*dilation, ..., p_j` (step `dilation`). Frames before the stream start are zeros,
and so are frames after its end: offline pads L zeros on the right, and `flush` emits the L/s
outputs that the look-ahead held back, computed the same way.

Streaming keeps the last W = (K-1)*dilation (at least 1) committed input frames of each row
and a per-row frame counter (its value mod stride is the stride phase). A step builds, per row,
`history ++ chunk`, gathers the part of it whose stride grid lines up with that row's due
outputs, and runs the same strided conv as the offline path: exact for any chunking.

A pointwise conv (kernel 1, stride 1, no look-ahead) needs no history: it is frame-wise, with
no carry, and a step is the offline map of its chunk (no window to build, no frames to gather).

The depthwise causal case (groups = in = out features, stride 1, no look-ahead) runs the fused
`pallas_kernels.causal_depthwise_conv` kernel (conv + history update in one pass) when `impl`
resolves to a Pallas implementation ("auto": on GPU/TPU); otherwise, and on CPU, the XLA path.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.checks import check_positive_int
from streamzoo.core.frames import take_frames
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.pallas_kernels import causal_depthwise_conv as dwconv
from streamzoo.pallas_kernels.dispatch import IMPLS, resolve_impl

_DIMS = ("NWC", "WIO", "NWC")


@struct.dataclass
class ConvCarry:
    history: jax.Array  # [B, W, in_features] the row's last W committed input frames, oldest first
    seen: jax.Array  # [B] int32 committed input frames (saturating; keeps the phase mod stride)


def check_groups(in_features: int, out_features: int, groups) -> int:
    """`groups` must divide both feature sizes (groups=in_features gives a depthwise conv)."""
    check_positive_int("groups", groups)
    if in_features % groups or out_features % groups:
        raise ValueError(
            f"groups: expected a divisor of in_features={in_features} and "
            f"out_features={out_features}, got {groups}")
    return groups


def conv_params(rngs, kernel_size, in_features, out_features, groups, use_bias):
    """A `[K, in / groups, out]` LeCun-normal kernel and a zero bias (or None), float32."""
    init = nnx.initializers.lecun_normal()
    kernel = nnx.Param(init(rngs.params(), (kernel_size, in_features // groups, out_features),
                            jnp.float32))
    bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
    return kernel, bias


class Conv1D(StreamLayer):
    """Causal (or bounded look-ahead) 1-D conv: `[B, T, in_features] -> [B, T // stride, out]`.

    `lookahead` (input frames, a multiple of `stride`) lets each output see that many future
    frames; the layer then holds back `lookahead // stride` outputs until `flush`.
    Parameters are float32; the conv runs in `dtype` (default: the input's dtype).
    `impl` picks the depthwise kernel's implementation (`pallas_kernels.dispatch`).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
                 dilation: int = 1, groups: int = 1, lookahead: int = 0, use_bias: bool = True,
                 dtype=None, impl: str = "auto", rngs: nnx.Rngs):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.stride = check_positive_int("stride", stride)
        self.dilation = check_positive_int("dilation", dilation)
        self.groups = check_groups(in_features, out_features, groups)
        if not isinstance(lookahead, int) or lookahead < 0 or lookahead % stride:
            raise ValueError(
                f"lookahead: expected a non-negative int multiple of stride={stride} (so that "
                f"the held-back outputs are whole output frames), got {lookahead!r}")
        self.lookahead = lookahead
        self.dtype = dtype
        if impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self.kernel, self.bias = conv_params(rngs, kernel_size, in_features, out_features, groups,
                                             use_bias)
        # Kernel 1, stride 1, no look-ahead: each output frame is a map of its own input frame.
        self.frame_wise = kernel_size == 1 and stride == 1 and lookahead == 0

    # ------------------------------------------------------------------ geometry
    @property
    def span(self) -> int:
        """Input frames a window covers beyond its last one: (K-1)*dilation."""
        return (self.kernel_size - 1) * self.dilation

    @property
    def history_size(self) -> int:
        """Frames kept in the carry (at least one, so that no carry leaf is empty)."""
        return max(self.span, 1)

    @property
    def spec(self) -> StreamSpec:
        s, look = self.stride, self.lookahead
        return StreamSpec(block_size=s, output_ratio=Fraction(1, s),
                          input_latency=look, output_latency=look // s,
                          receptive_field=(float(look - self.span), float(look)))

    # ------------------------------------------------------------------ compute
    def _compute_dtype(self, input_dtype):
        return self.dtype or input_dtype

    def _conv(self, v: jax.Array) -> jax.Array:
        """Strided VALID conv: output m reads `v[m*s : m*s + span + 1 : dilation]`."""
        y = jax.lax.conv_general_dilated(
            v, self.kernel[...].astype(v.dtype), window_strides=(self.stride,), padding="VALID",
            rhs_dilation=(self.dilation,), dimension_numbers=_DIMS,
            feature_group_count=self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def _fused_impl(self) -> str | None:
        """The depthwise kernel's implementation when this conv can use it and `impl` resolves
        to a Pallas one; None for the XLA path."""
        if self.frame_wise or not (self.groups == self.in_features == self.out_features
                                   and self.stride == 1 and self.lookahead == 0):
            return None
        impl = resolve_impl(self.impl, dwconv.KERNEL, dwconv.SUPPORTED)
        return None if impl == "xla" else impl

    def _fused(self, impl, v, history, lengths):
        bias = None if self.bias is None else self.bias[...]
        return dwconv.causal_depthwise_conv(v, history, self.kernel[...][:, 0, :], bias,
                                            dilation=self.dilation, lengths=lengths, impl=impl)

    def _empty(self, batch_size, dtype) -> Seq:
        return Seq.empty(batch_size, (self.out_features,), dtype)

    def _forward(self, x: Seq) -> Seq:
        dtype = self._compute_dtype(x.dtype)
        n_out = x.length // self.stride
        if n_out == 0:
            return self._empty(x.batch_size, dtype)
        if self.frame_wise:
            return x.replace(values=self._conv(x.values.astype(dtype))).masked()
        if (impl := self._fused_impl()) is not None:
            y, _ = self._fused(impl, x.values.astype(dtype), None, x.lengths())
            return Seq(y, x.mask, compact=True).masked()
        # Output j's window ends at p_j = (j+1)*s - 1 + L: pad `span` zeros on the left and L
        # on the right, then drop the first s-1+L padded frames so that window j starts at j*s.
        lo = self.span - (self.stride - 1) - self.lookahead
        v = jnp.pad(x.values.astype(dtype), ((0, 0), (max(lo, 0), self.lookahead), (0, 0)))
        y = self._conv(v[:, max(-lo, 0):])
        mask = jnp.arange(n_out)[None, :] < (x.lengths() // self.stride)[:, None]
        return Seq(y, mask, compact=True).masked()

    def _init_carry(self, batch_size, dtype):
        if self.frame_wise:
            return super()._init_carry(batch_size, dtype)
        dtype = dtype or self.dtype or jnp.float32
        return ConvCarry(jnp.zeros((batch_size, self.history_size, self.in_features), dtype),
                         jnp.zeros((batch_size,), jnp.int32))

    def _due(self, seen, window, lengths):
        """The outputs whose window ends among the new frames of `window = history ++ new`.

        Row b's new frames are its frames `seen[b] .. seen[b] + lengths[b] - 1` (a prefix of
        the T new ones). Returns `(y [B, T // s, out], count [B])`: row b's due outputs first.
        """
        s, look, span = self.stride, self.lookahead, self.span
        if s == 1 and not look:
            # Every row's due outputs are exactly its new frames, and the window ending at new
            # frame t starts at history frame t: the whole window, no per-row gather.
            return self._conv(window), lengths
        slots = (window.shape[1] - self.history_size) // s
        # First chunk frame t that ends a window: (seen + t + 1 - L) divisible by s, and the
        # output index (seen + t + 1 - L) / s - 1 not negative.
        first = jnp.maximum(jnp.mod(look - 1 - seen, s), s - 1 + look - seen)
        count = jnp.clip((lengths - first + s - 1) // s, 0, slots)
        # New frame t sits at W + t of the window; output slot m reads from W + first - span + m*s.
        start = self.history_size + first - span
        aligned = take_frames(window, start, span + (slots - 1) * s + 1)
        y = self._conv(aligned)
        return y, count

    def _step(self, carry: ConvCarry, x: Seq):
        dtype = self._compute_dtype(x.dtype)
        if x.length == 0:
            return carry, self._empty(x.batch_size, dtype)
        if self.frame_wise:
            return carry, self._forward(x)
        lengths = x.lengths()
        if (impl := self._fused_impl()) is not None:
            y, history = self._fused(impl, x.values.astype(dtype), carry.history.astype(dtype),
                                     lengths)
            return (ConvCarry(history.astype(carry.history.dtype),
                              self._advance(carry.seen, lengths)),
                    Seq(y, x.mask, compact=True).masked())
        window = jnp.concatenate([carry.history.astype(dtype), x.values.astype(dtype)], axis=1)
        y, count = self._due(carry.seen, window, lengths)
        history = take_frames(window, lengths, self.history_size).astype(carry.history.dtype)
        out = Seq(y, jnp.arange(y.shape[1])[None, :] < count[:, None], compact=True).masked()
        return ConvCarry(history, self._advance(carry.seen, lengths)), out

    def _advance(self, seen, lengths):
        """`seen + lengths`, saturating at a cap (a multiple of stride beyond which only the
        phase matters), so that the counter never overflows on endless streams."""
        cap = self.lookahead + self.stride
        seen = seen + lengths
        return jnp.where(seen >= cap, cap + jnp.mod(seen - cap, self.stride), seen)

    def _flush(self, carry: ConvCarry, batch_size: int):
        """The `lookahead // stride` held-back outputs, computed with zeros after the stream end.

        The carry is returned unchanged: flushing commits no frames.
        """
        if not self.lookahead:
            return carry, self._empty(batch_size, self._compute_dtype(
                carry.history.dtype if isinstance(carry, ConvCarry) else jnp.float32))
        dtype = self._compute_dtype(carry.history.dtype)
        zeros = jnp.zeros((batch_size, self.lookahead, self.in_features), dtype)
        window = jnp.concatenate([carry.history.astype(dtype), zeros], axis=1)
        y, count = self._due(carry.seen, window,
                             jnp.full((batch_size,), self.lookahead, jnp.int32))
        mask = jnp.arange(y.shape[1])[None, :] < count[:, None]
        return carry, Seq(y, mask, compact=True).masked()
