"""Frame-wise normalisation: `LayerNorm` and `RMSNorm` (statistics over features only,
so streaming equals offline trivially; BatchNorm-style time statistics are not streamable)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from streamzoo.core.seq import Seq
from streamzoo.core.streamer import StreamLayer


class RMSNorm(StreamLayer):
    """`x / rms(x) * scale`, statistics in float32."""

    frame_wise = True

    def __init__(self, features: int, *, eps: float = 1e-6, rngs: nnx.Rngs | None = None):
        self.in_features = self.out_features = features
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))

    def _norm(self, v):
        v32 = v.astype(jnp.float32)
        v32 = v32 * jnp.reciprocal(jnp.sqrt(jnp.mean(v32 * v32, -1, keepdims=True) + self.eps))
        return (v32 * self.scale[...]).astype(v.dtype)

    def _forward(self, x: Seq) -> Seq:
        return x.map(self._norm).masked()

    def _step(self, carry, x):
        return carry, self._forward(x)


class LayerNorm(StreamLayer):
    """`(x - mean) / std * scale + bias` over features, statistics in float32."""

    frame_wise = True

    def __init__(self, features: int, *, eps: float = 1e-6, rngs: nnx.Rngs | None = None):
        self.in_features = self.out_features = features
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def _norm(self, v):
        v32 = v.astype(jnp.float32)
        mean = v32.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(v32 - mean), -1, keepdims=True)
        out = (v32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))
        return (out * self.scale[...] + self.bias[...]).astype(v.dtype)

    def _forward(self, x: Seq) -> Seq:
        return x.map(self._norm).masked()

    def _step(self, carry, x):
        return carry, self._forward(x)
