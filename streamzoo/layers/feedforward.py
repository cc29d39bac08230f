"""Frame-wise feed-forward blocks: `FeedForward` (Linear-act-Linear) and its gated form
(GLU family: SwiGLU, GeGLU) selected with `gated=True`."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from streamzoo.core.seq import Seq
from streamzoo.core.streamer import StreamLayer


class FeedForward(StreamLayer):
    """`W2 act(W1 x)`, or `W2 (act(W1 x) * (V x))` when `gated` (SwiGLU with act=silu)."""

    frame_wise = True

    def __init__(self, features: int, hidden: int, *, out_features: int | None = None,
                 activation: Callable = jax.nn.silu, gated: bool = False, use_bias: bool = True,
                 dtype=None, rngs: nnx.Rngs):
        self.in_features = features
        self.out_features = out_features or features
        self.activation = activation
        self.gated = gated
        self.dtype = dtype
        width = 2 * hidden if gated else hidden
        self.up = nnx.Linear(features, width, use_bias=use_bias, rngs=rngs)
        self.down = nnx.Linear(hidden, self.out_features, use_bias=use_bias, rngs=rngs)

    def _ffn(self, v):
        dtype = self.dtype or v.dtype
        h = _linear(self.up, v.astype(dtype))
        if self.gated:
            a, g = jnp.split(h, 2, axis=-1)
            h = self.activation(a) * g
        else:
            h = self.activation(h)
        return _linear(self.down, h)

    def _forward(self, x: Seq) -> Seq:
        return x.map(self._ffn).masked()

    def _step(self, carry, x):
        return carry, self._forward(x)


def _linear(layer: nnx.Linear, v):
    """An `nnx.Linear` applied in the dtype of `v` (parameters stay float32)."""
    y = v @ layer.kernel[...].astype(v.dtype)
    if layer.bias is not None:
        y = y + layer.bias[...].astype(v.dtype)
    return y
