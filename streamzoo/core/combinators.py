"""Combinators: `Serial` (a chain), `Residual` (x + f(x), latency-aligned) and `Repeat`
(L identical layers with parameters and carries stacked `[L, ...]`, run by `lax.scan`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.frames import take_frames
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec, compose
from streamzoo.core.streamer import StreamLayer, batch_size_of


def _pipe_tail(layers, carries, tail: Seq | None):
    """Push frames emitted by an earlier flush through `layers`' step, then their flush."""
    new_carries = []
    for layer, c in zip(layers, carries):
        if tail is not None and tail.length:
            c, tail = layer.step(c, tail.pad_to_multiple(layer.spec.block_size))
        else:
            tail = None  # an empty tail has the previous layer's feature shape
        c, out = layer.flush(c)
        tail = out if tail is None else Seq.concatenate([tail, out]).compacted()
        new_carries.append(c)
    return new_carries, tail


@struct.dataclass
class SerialCarry:
    layers: tuple

    @property
    def batch_size(self):
        return batch_size_of(self.layers[0])


class Serial(StreamLayer):
    """Layers applied one after another; the carry holds one sub-carry per layer."""

    def __init__(self, *layers: StreamLayer):
        if not layers:
            raise ValueError("layers: expected at least one layer")
        self.layers = nnx.List(list(layers))
        self.in_features = layers[0].in_features
        self.out_features = layers[-1].out_features
        self._spec = compose(l.spec for l in layers)
        for i, (a, b) in enumerate(zip(layers[:-1], layers[1:])):
            if a.output_frame_shape != b.input_frame_shape:
                raise ValueError(
                    f"layers[{i + 1}]: expected input feature shape {a.output_frame_shape} "
                    f"(the output of layers[{i}]), got {b.input_frame_shape}")

    @property
    def spec(self) -> StreamSpec:
        return self._spec

    def input_kind(self):
        return self.layers[0].input_kind()

    def _init_carry(self, batch_size, dtype):
        return SerialCarry(tuple(l.init_carry(batch_size, dtype) for l in self.layers))

    def _forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def _step(self, carry, x):
        new = []
        for layer, c in zip(self.layers, carry.layers):
            c, x = layer.step(c, x)
            new.append(c)
        return SerialCarry(tuple(new)), x

    def _flush(self, carry, batch_size):
        new, tail = _pipe_tail(list(self.layers), list(carry.layers), None)
        return SerialCarry(tuple(new)), tail

    def _reset_rows(self, carry, rows, batch_size):
        return SerialCarry(tuple(l.reset_rows(c, rows) for l, c in zip(self.layers, carry.layers)))


@struct.dataclass
class ResidualCarry:
    inner: object
    skip: jax.Array | None  # [B, L, *frame] the last L valid inputs (L = inner latency)
    seen: jax.Array | None  # [B] int32 valid input frames so far

    @property
    def batch_size(self):
        return batch_size_of(self.inner)


class Residual(StreamLayer):
    """`x + inner(x)`. When `inner` has look-ahead, the skip path is delayed to match it."""

    def __init__(self, inner: StreamLayer):
        spec = inner.spec
        if spec.output_ratio != 1 or inner.output_frame_shape != inner.input_frame_shape:
            raise ValueError(
                f"inner: a residual needs output_ratio 1 and equal in/out feature shapes, got "
                f"ratio {spec.output_ratio}, {inner.input_frame_shape} -> {inner.output_frame_shape}")
        self.inner = inner
        self.in_features = inner.in_features
        self.out_features = inner.out_features
        self.delay = spec.output_latency

    @property
    def spec(self):
        s = self.inner.spec
        past, future = s.receptive_field
        return dataclasses.replace(s, receptive_field=(min(past, 0.0), max(future, 0.0)))

    def input_kind(self):
        return self.inner.input_kind()

    def _init_carry(self, batch_size, dtype):
        inner = self.inner.init_carry(batch_size, dtype)
        if not self.delay:
            return ResidualCarry(inner, None, None)
        skip = jnp.zeros((batch_size, self.delay, *self.input_frame_shape), dtype or jnp.float32)
        return ResidualCarry(inner, skip, jnp.zeros((batch_size,), jnp.int32))

    def _forward(self, x):
        y = self.inner(x)
        return y.replace(values=y.values + x.values.astype(y.dtype)).masked()

    def _step(self, carry, x):
        inner, y = self.inner.step(carry.inner, x)
        if not self.delay:
            return ResidualCarry(inner, None, None), y.replace(values=y.values + x.values.astype(y.dtype))
        window, offset, seen = _delay_window(carry.skip, carry.seen, x, self.delay)
        aligned = take_frames(window, offset, y.length)
        return (ResidualCarry(inner, _last_valid(window, x.lengths() + self.delay, self.delay), seen),
                y.replace(values=y.values + aligned.astype(y.dtype)).masked())

    def _flush(self, carry, batch_size):
        inner, y = self.inner.flush(carry.inner)
        if not self.delay:
            return ResidualCarry(inner, None, None), y
        # The inner flush emits the outputs of the last min(seen, L) inputs, compacted.
        offset = jnp.maximum(0, self.delay - carry.seen)
        aligned = take_frames(carry.skip, offset, y.length)
        return (ResidualCarry(inner, carry.skip, carry.seen),
                y.replace(values=y.values + aligned.astype(y.dtype)).masked())

    def _reset_rows(self, carry, rows, batch_size):
        fresh = self.init_carry(batch_size)
        inner = self.inner.reset_rows(carry.inner, rows)
        if not self.delay:
            return ResidualCarry(inner, None, None)
        r = rows.reshape((-1,) + (1,) * (carry.skip.ndim - 1))
        return ResidualCarry(inner, jnp.where(r, fresh.skip.astype(carry.skip.dtype), carry.skip),
                             jnp.where(rows, fresh.seen, carry.seen))


def _delay_window(skip, seen, x: Seq, delay):
    """`[skip ++ x]` and the per-row offset of the first input whose output emerges now."""
    window = jnp.concatenate([skip, x.values.astype(skip.dtype)], axis=1)
    offset = jnp.maximum(0, delay - seen)
    return window, offset, seen + x.lengths()


def _last_valid(window, end, count):
    """Per row: the `count` frames of `window` ending (exclusive) at `end[b]`."""
    return take_frames(window, end - count, count)


@struct.dataclass
class RepeatCarry:
    layers: object  # the layer carry with every leaf stacked [L, ...]

    @property
    def batch_size(self):
        leaves = jax.tree_util.tree_leaves(self.layers)
        if leaves:  # stacked leaves are [L, B, ...]
            return leaves[0].shape[1]
        return batch_size_of(self.layers)  # leaf-less carries know their batch size statically


class Repeat(StreamLayer):
    """`num_layers` identical layers, parameters and carries stacked `[L, ...]`, scanned.

    `make_layer(rngs)` builds one layer; it is called under `jax.vmap` over L keys, so the
    stack has one leaf per parameter, whatever L (dispatch cost does not grow with depth).
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], StreamLayer], num_layers: int, *,
                 rngs: nnx.Rngs):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        keys = jax.random.split(rngs.params(), num_layers)
        self.layers = jax.vmap(lambda k: make_layer(nnx.Rngs(params=k)))(keys)
        self.num_layers = num_layers
        one = self.layers.spec
        if one.output_ratio != 1:
            raise ValueError(f"make_layer: Repeat needs layers with output_ratio 1, got {one.output_ratio}")
        self.in_features = self.layers.in_features
        self.out_features = self.layers.out_features
        if self.layers.input_frame_shape != self.layers.output_frame_shape:
            raise ValueError("make_layer: Repeat needs layers whose output feature shape equals their input's")
        self._spec = one.repeat(num_layers)

    @property
    def spec(self):
        return self._spec

    def input_kind(self):
        return self.layers.input_kind()

    def _init_carry(self, batch_size, dtype):
        one = self.layers.init_carry(batch_size, dtype)
        return RepeatCarry(jax.tree.map(
            lambda a: jnp.tile(a[None], (self.num_layers,) + (1,) * a.ndim), one))

    def _forward(self, x):
        def body(h, layer):
            return layer(h), None
        y, _ = jax.lax.scan(body, x, self.layers, length=self.num_layers)
        return y

    def _step(self, carry, x):
        def body(h, layer_and_carry):
            layer, c = layer_and_carry
            c, h = layer.step(c, h)
            return h, c
        y, new = jax.lax.scan(body, x, (self.layers, carry.layers), length=self.num_layers)
        return RepeatCarry(new), y

    def layer(self, i: int) -> StreamLayer:
        """The i-th layer as a stand-alone module (parameters sliced out of the stack)."""
        return jax.tree.map(lambda a: a[i], self.layers)

    def _flush(self, carry, batch_size):
        if not self.layers.spec.output_latency:
            return carry, Seq.empty(batch_size, self.output_frame_shape, self.output_dtype())
        layers = [self.layer(i) for i in range(self.num_layers)]
        carries = [jax.tree.map(lambda a: a[i], carry.layers) for i in range(self.num_layers)]
        new, tail = _pipe_tail(layers, carries, None)
        return RepeatCarry(jax.tree.map(lambda *a: jnp.stack(a), *new)), tail

    def _reset_rows(self, carry, rows, batch_size):
        if not jax.tree_util.tree_leaves(carry.layers):
            return carry
        return RepeatCarry(jax.vmap(lambda c: self.layers.reset_rows(c, rows))(carry.layers))
