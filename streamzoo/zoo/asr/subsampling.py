"""Streaming convolutional subsampling: `[B, T, n_mels] -> [B, T // factor, d_model]`.

`log2(factor)` causal stride-2 `Conv1D`s (each followed by an activation), then a frame-wise
linear projection to `d_model`. With 10 ms log-mel frames, factor 4 gives 40 ms encoder frames
(factor 8: 80 ms, FastConformer's rate). Each conv is causal (no look-ahead), so the block is
too: output frame j is final once input frame `factor*(j+1) - 1` has arrived, and a partial
block of fewer than `factor` frames at the end gives no output (like any strided conv).
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx, struct

from streamzoo.core.checks import check_positive_int
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec, compose
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.conv import Conv1D


@struct.dataclass
class SubsamplingCarry:
    convs: tuple  # one ConvCarry per stride-2 conv

    @property
    def batch_size(self) -> int:
        return self.convs[0].seen.shape[0]


def _num_stages(factor) -> int:
    check_positive_int("factor", factor)
    stages = factor.bit_length() - 1
    if factor < 2 or (1 << stages) != factor:
        raise ValueError(f"factor: expected a power of two >= 2 (2, 4, 8, ...), got {factor}")
    return stages


class ConvSubsampling(StreamLayer):
    """Causal stride-2 conv stack + linear projection (see module docstring).

    `channels` (default `out_features`) is the conv width, `kernel_size` (default 3) each
    conv's taps. Parameters are float32; compute runs in `dtype` or the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, factor: int = 4,
                 channels: int | None = None, kernel_size: int = 3,
                 activation: Callable = jax.nn.silu, dtype=None, rngs: nnx.Rngs):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.factor = factor
        stages = _num_stages(factor)
        channels = out_features if channels is None else check_positive_int("channels", channels)
        check_positive_int("kernel_size", kernel_size)
        self.activation = activation
        self.dtype = dtype
        widths = [in_features] + [channels] * stages
        self.convs = nnx.List([Conv1D(a, b, kernel_size, stride=2, dtype=dtype, rngs=rngs)
                               for a, b in zip(widths[:-1], widths[1:])])
        self.proj = nnx.Linear(channels, out_features, rngs=rngs)
        self._spec = compose(c.spec for c in self.convs)

    @property
    def spec(self) -> StreamSpec:
        return self._spec

    def _project(self, y: Seq) -> Seq:
        v = y.values
        out = v @ self.proj.kernel[...].astype(v.dtype) + self.proj.bias[...].astype(v.dtype)
        return Seq(out, y.mask, compact=True).masked()

    def _act(self, y: Seq) -> Seq:
        return y.map(self.activation)

    def _forward(self, x: Seq) -> Seq:
        for conv in self.convs:
            x = self._act(conv(x))
        return self._project(x)

    def _init_carry(self, batch_size, dtype):
        return SubsamplingCarry(tuple(c.init_carry(batch_size, dtype) for c in self.convs))

    def _step(self, carry: SubsamplingCarry, x: Seq):
        new = []
        for conv, c in zip(self.convs, carry.convs):
            c, x = conv.step(c, x)
            x = self._act(x)
            new.append(c)
        return SubsamplingCarry(tuple(new)), self._project(x)

    def _reset_rows(self, carry, rows, batch_size):
        return SubsamplingCarry(tuple(c.reset_rows(cc, rows)
                                      for c, cc in zip(self.convs, carry.convs)))


__all__ = ["ConvSubsampling", "SubsamplingCarry"]
