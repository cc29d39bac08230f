"""Tiny hand-written layers for testing the core and the harness (correct and broken ones)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer


@struct.dataclass
class LookaheadCarry:
    pending: jax.Array  # [B, D] the last committed frame, whose output waits for the next one
    seen: jax.Array     # [B] int32 committed frames


class NextFrameMix(StreamLayer):
    """`y[t] = x[t] * w + x[t + 1] * u` (zero after the end): one frame of look-ahead."""

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.in_features = self.out_features = features
        self.w = nnx.Param(jax.random.normal(rngs.params(), (features,)))
        self.u = nnx.Param(jax.random.normal(rngs.params(), (features,)))

    @property
    def spec(self):
        return StreamSpec(input_latency=1, output_latency=1, receptive_field=(0.0, 1.0))

    def _init_carry(self, batch_size, dtype):
        return LookaheadCarry(jnp.zeros((batch_size, self.in_features), jnp.float32),
                              jnp.zeros((batch_size,), jnp.int32))

    def _mix(self, cur, nxt):
        return cur * self.w[...] + nxt * self.u[...]

    def _forward(self, x: Seq) -> Seq:
        nxt = jnp.pad(x.values[:, 1:], [(0, 0), (0, 1), (0, 0)])
        return x.replace(values=self._mix(x.values, nxt)).masked()

    def _step(self, carry, x):
        n = x.lengths()
        window = jnp.concatenate([carry.pending[:, None].astype(x.dtype), x.values], axis=1)
        offset = (carry.seen == 0).astype(jnp.int32)  # no pending frame yet: skip slot 0
        k = jnp.arange(x.length)[None, :] + offset[:, None]
        cur = jnp.take_along_axis(window, k[..., None], axis=1)
        nxt = jnp.take_along_axis(window, jnp.minimum(k + 1, x.length)[..., None], axis=1)
        count = jnp.maximum(n - offset, 0)
        mask = jnp.arange(x.length)[None, :] < count[:, None]
        last = jnp.take_along_axis(window, n[:, None, None], axis=1)[:, 0]
        pending = jnp.where((n > 0)[:, None], last.astype(jnp.float32), carry.pending)
        y = Seq(self._mix(cur, nxt), mask, compact=True).masked()
        return LookaheadCarry(pending, carry.seen + n), y

    def _flush(self, carry, batch_size):
        y = self._mix(carry.pending, jnp.zeros_like(carry.pending))[:, None]
        return carry, Seq(y, (carry.seen > 0)[:, None], compact=True).masked()


@struct.dataclass
class ConvCarry:
    buffer: jax.Array  # [B, K - 1, D] the last K - 1 committed frames


class DepthwiseCausalConv(StreamLayer):
    """A minimal correct causal depthwise conv (kernel K)."""

    def __init__(self, features: int, kernel: int = 3, *, rngs: nnx.Rngs):
        self.in_features = self.out_features = features
        self.kernel = kernel
        self.w = nnx.Param(jax.random.normal(rngs.params(), (kernel, features)))

    @property
    def spec(self):
        return StreamSpec(receptive_field=(-(self.kernel - 1.0), 0.0))

    def _init_carry(self, batch_size, dtype):
        return ConvCarry(jnp.zeros((batch_size, self.kernel - 1, self.in_features), jnp.float32))

    def _conv(self, window, length):
        w = self.w[...]
        return sum(window[:, k:k + length] * w[k] for k in range(self.kernel))

    def _forward(self, x):
        window = jnp.pad(x.values, [(0, 0), (self.kernel - 1, 0), (0, 0)])
        return x.replace(values=self._conv(window, x.length)).masked()

    def _step(self, carry, x):
        window = jnp.concatenate([carry.buffer.astype(x.dtype), x.values], axis=1)
        idx = x.lengths()[:, None] + jnp.arange(self.kernel - 1)[None, :]
        buffer = jnp.take_along_axis(window, idx[..., None], axis=1)
        return ConvCarry(buffer.astype(jnp.float32)), x.replace(values=self._conv(window, x.length)).masked()


# ------------------------------------------------------------------ deliberately broken
class ConvDropsBuffer(DepthwiseCausalConv):
    """Bug: every step starts from an empty buffer (the carry is ignored)."""

    def _step(self, carry, x):
        fresh = self._init_carry(x.batch_size, None)
        return super()._step(fresh, x)


@struct.dataclass
class PositionCarry:
    pos: jax.Array  # [B] int32


class RotateByPosition(StreamLayer):
    """`y[t] = x[t] * cos(theta * pos(t))`: a stand-in for RoPE, positions from a counter."""

    def __init__(self, features: int, *, rngs: nnx.Rngs | None = None):
        self.in_features = self.out_features = features
        self.theta = 0.37

    @property
    def spec(self):
        return StreamSpec(receptive_field=(0.0, 0.0))

    def _init_carry(self, batch_size, dtype):
        return PositionCarry(jnp.zeros((batch_size,), jnp.int32))

    def _rotate(self, x, pos):
        return x.replace(values=x.values * jnp.cos(self.theta * pos)[..., None].astype(x.dtype)).masked()

    def _forward(self, x):
        return self._rotate(x, jnp.broadcast_to(jnp.arange(x.length), x.mask.shape))

    def _positions(self, carry, x):
        return carry.pos[:, None] + jnp.arange(x.length)[None, :]

    def _advance(self, carry, x):
        return PositionCarry(carry.pos + x.lengths())

    def _step(self, carry, x):
        return self._advance(carry, x), self._rotate(x, self._positions(carry, x))


class RotateByPhysicalSlot(RotateByPosition):
    """Bug: positions are physical slot indices of a ring of 4, not logical positions."""

    def _positions(self, carry, x):
        return (carry.pos[:, None] + jnp.arange(x.length)[None, :]) % 4


class RotateAdvancesOnMasked(RotateByPosition):
    """Bug: the carry advances by the chunk length, masked frames included."""

    def _advance(self, carry, x):
        return PositionCarry(carry.pos + x.length)

    def _step(self, carry, x):
        # Without compaction-aware positions, invalid frames shift the positions of later ones.
        pos = carry.pos[:, None] + jnp.cumsum(jnp.ones_like(x.mask, jnp.int32), axis=1) - 1
        return self._advance(carry, x), self._rotate(x, pos)


class FlushLosesTail(NextFrameMix):
    """Bug: flush returns nothing, so the last output of every stream is lost."""

    def _flush(self, carry, batch_size):
        return carry, Seq.empty(batch_size, (self.in_features,))


class LatencyUnderstated(NextFrameMix):
    """Bug: the spec claims a causal layer, but output t reads frame t + 1."""

    @property
    def spec(self):
        return StreamSpec(input_latency=1, output_latency=1, receptive_field=(0.0, 0.0))


class LeaksMaskedFrames(DepthwiseCausalConv):
    """Bug: the offline path does not zero invalid frames, so NaN padding leaks."""

    def __call__(self, x):
        self.check_input(x, "x")
        window = jnp.pad(x.values, [(0, 0), (self.kernel - 1, 0), (0, 0)])
        return Seq(self._conv(window, x.length), x.mask, compact=True)


class CarryChangesDtype(RotateByPosition):
    """Bug: the carry changes dtype after a step (int32 -> int16), forcing recompilation."""

    def _advance(self, carry, x):
        return PositionCarry((carry.pos + x.lengths()).astype(jnp.int16))
