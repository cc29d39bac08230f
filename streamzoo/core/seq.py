"""`Seq`: a batch of sequences as `values [B, T, ...]` plus a validity `mask [B, T]`.

A frame whose mask is False is *not committed*: layers skip it (it neither produces a
valid output nor advances a carry). Only the order of a row's valid frames carries meaning,
so a row's valid frames may sit anywhere along T. `compact=True` is a static promise that
each row's valid frames form a prefix (`mask[b, t] == t < lengths[b]`); layers that look
across time rely on it and call `compacted()` first, which is free when the promise holds.
"""

from __future__ import annotations

from typing import Sequence as PySequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Seq:
    """Values `[B, T, *frame_shape]` and mask `[B, T]` (bool, True = valid)."""

    values: jax.Array
    mask: jax.Array
    compact: bool = struct.field(pytree_node=False, default=False)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_lengths(cls, values, lengths) -> "Seq":
        """Rows whose first `lengths[b]` frames are valid (end padding)."""
        values = jnp.asarray(values)
        if values.ndim < 2:
            raise ValueError(f"values: expected rank >= 2 [B, T, ...], got shape {values.shape}")
        lengths = jnp.asarray(lengths)
        if lengths.shape != values.shape[:1]:
            raise ValueError(
                f"lengths: expected shape {values.shape[:1]} (one per row), got {lengths.shape}")
        mask = jnp.arange(values.shape[1])[None, :] < lengths[:, None]
        return cls(values, mask, compact=True)

    @classmethod
    def full(cls, values) -> "Seq":
        """All frames valid."""
        values = jnp.asarray(values)
        if values.ndim < 2:
            raise ValueError(f"values: expected rank >= 2 [B, T, ...], got shape {values.shape}")
        return cls(values, jnp.ones(values.shape[:2], bool), compact=True)

    @classmethod
    def empty(cls, batch_size: int, frame_shape=(), dtype=jnp.float32, length: int = 0) -> "Seq":
        """`length` invalid (zero) frames per row; `length=0` gives a zero-length sequence."""
        values = jnp.zeros((batch_size, length, *frame_shape), dtype)
        return cls(values, jnp.zeros((batch_size, length), bool), compact=True)

    # ------------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def length(self) -> int:
        """Physical length T (valid or not)."""
        return self.values.shape[1]

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[2:])

    @property
    def dtype(self):
        return self.values.dtype

    def lengths(self) -> jax.Array:
        """Number of valid frames per row, `[B]` int32."""
        return self.mask.sum(axis=1, dtype=jnp.int32)

    def expanded_mask(self) -> jax.Array:
        """The mask broadcastable against `values`."""
        return self.mask.reshape(self.mask.shape + (1,) * (self.values.ndim - 2))

    # ------------------------------------------------------------------- transforms
    def masked(self) -> "Seq":
        """Invalid frames set to zero, so that garbage (even NaN) in them cannot leak."""
        return self.replace(values=jnp.where(self.expanded_mask(), self.values,
                                             jnp.zeros((), self.values.dtype)))

    def compacted(self) -> "Seq":
        """Each row's valid frames moved, in order, to the front; the rest zeroed."""
        if self.compact:
            return self.masked()
        order = jnp.argsort(~self.mask, axis=1, stable=True)
        idx = order.reshape(order.shape + (1,) * (self.values.ndim - 2))
        values = jnp.take_along_axis(self.values, idx, axis=1)
        mask = jnp.arange(self.length)[None, :] < self.lengths()[:, None]
        return Seq(values, mask, compact=True).masked()

    def map(self, fn) -> "Seq":
        """Apply a frame-wise function to the values; mask and compactness are kept."""
        return self.replace(values=fn(self.values))

    def time_slice(self, start: int, stop: int) -> "Seq":
        """Frames `start:stop` (static); a slice of a compact sequence is compact."""
        return Seq(self.values[:, start:stop], self.mask[:, start:stop], self.compact)

    def pad_to_multiple(self, block_size: int) -> "Seq":
        """Append invalid frames so that T is a multiple of `block_size`."""
        pad = (-self.length) % block_size
        if pad == 0:
            return self
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (self.values.ndim - 2)
        return Seq(jnp.pad(self.values, widths), jnp.pad(self.mask, [(0, 0), (0, pad)]),
                   self.compact)

    def astype(self, dtype) -> "Seq":
        return self.replace(values=self.values.astype(dtype))

    @staticmethod
    def concatenate(seqs: PySequence["Seq"]) -> "Seq":
        """Concatenate along time. The result is compact only if it is trivially so."""
        seqs = [s for s in seqs if s is not None]
        if not seqs:
            raise ValueError("seqs: expected at least one Seq, got none")
        if len(seqs) == 1:
            return seqs[0]
        values = jnp.concatenate([s.values for s in seqs], axis=1)
        mask = jnp.concatenate([s.mask for s in seqs], axis=1)
        return Seq(values, mask, compact=False)

    # --------------------------------------------------------------- host-side help
    def rows(self) -> list[np.ndarray]:
        """The valid frames of every row as numpy arrays (for tests and demos)."""
        values, mask = np.asarray(self.values), np.asarray(self.mask)
        return [values[b][mask[b]] for b in range(values.shape[0])]
