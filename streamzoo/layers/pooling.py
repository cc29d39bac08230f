"""Causal cumulative mean pooling: output t is the mean of valid inputs 0..t of its row.

The carry holds a float32 running sum and a per-row count of committed frames, so the
mean is a function of logical position, not of physical buffer index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer


@struct.dataclass
class CumulativeMeanCarry:
    total: jax.Array  # [B, D] float32 running sum of committed frames
    count: jax.Array  # [B] int32 committed frames


class CumulativeMean(StreamLayer):
    """Running mean over time; `receptive_field = (-inf, 0)`."""

    def __init__(self, features: int, *, rngs: nnx.Rngs | None = None):
        self.in_features = self.out_features = features

    @property
    def spec(self):
        return StreamSpec(receptive_field=(-float("inf"), 0.0))

    def _init_carry(self, batch_size, dtype):
        return CumulativeMeanCarry(jnp.zeros((batch_size, self.in_features), jnp.float32),
                                   jnp.zeros((batch_size,), jnp.int32))

    def _means(self, carry, x: Seq):
        v = jnp.where(x.mask[..., None], x.values.astype(jnp.float32), 0.0)
        sums = carry.total[:, None, :] + jnp.cumsum(v, axis=1)
        counts = carry.count[:, None] + jnp.cumsum(x.mask, axis=1, dtype=jnp.int32)
        means = sums / jnp.maximum(counts, 1)[..., None].astype(jnp.float32)
        return sums, counts, x.replace(values=means.astype(x.dtype)).masked()

    def _forward(self, x):
        return self._means(self._init_carry(x.batch_size, None), x)[2]

    def _step(self, carry, x):
        sums, counts, y = self._means(carry, x)
        return CumulativeMeanCarry(sums[:, -1], counts[:, -1]), y
