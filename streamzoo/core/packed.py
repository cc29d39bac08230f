"""A carry packed into one flat buffer per dtype (`PackedCarry`), for hot streaming loops.

A model's carry is a pytree with one array per buffer of every layer (the codec's: ~70). Each
array that crosses a jitted call's boundary costs the runtime a few µs (an output buffer to
allocate and wrap, a leaf to flatten and rebuild), which for a small step is a large part of
its time. `pack_carry(carry)` gives the same state as one 1-D buffer per dtype; `jit_step`,
`jit_flush` and `jitted_step` accept it in place of the carry and return the next state packed
the same way (unpacking and repacking happen inside the compiled program: static slices and
one concatenation per dtype). `packed.unpack()` gives the carry back, bit for bit, for
anything that needs its structure (`reset_rows`, inspection, checkpoints).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


class CarryLayout(NamedTuple):
    """Where each leaf of a carry sits in its packed buffers (static, hashable)."""

    treedef: Any             # the carry's pytree structure
    dtypes: tuple            # the buffers' dtypes (one buffer per dtype, first-seen order)
    slots: tuple             # per leaf: (buffer index, offset, shape)


@struct.dataclass
class PackedCarry:
    """A carry as one 1-D buffer per dtype; `unpack()` restores it. Build with `pack_carry`."""

    buffers: tuple
    layout: CarryLayout = struct.field(pytree_node=False)

    def unpack(self):
        """The carry this was packed from (same structure, shapes, dtypes and values)."""
        leaves = [self.buffers[buf][offset:offset + math.prod(shape)].reshape(shape)
                  for buf, offset, shape in self.layout.slots]
        return jax.tree_util.tree_unflatten(self.layout.treedef, leaves)


def pack_carry(carry) -> PackedCarry:
    """`carry` (any pytree of arrays) as a `PackedCarry`: each dtype's leaves raveled and
    concatenated in leaf order. Works under `jax.jit` and eagerly."""
    if isinstance(carry, PackedCarry):
        raise ValueError("carry: expected an unpacked carry, got a PackedCarry")
    leaves, treedef = jax.tree_util.tree_flatten(carry)
    dtypes, parts, offsets, slots = [], [], [], []
    for leaf in leaves:
        if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
            raise ValueError(f"carry: expected a pytree of arrays, got a leaf of type "
                             f"{type(leaf).__name__}")
        dtype = np.dtype(leaf.dtype)
        if dtype not in dtypes:
            dtypes.append(dtype)
            parts.append([])
            offsets.append(0)
        buf = dtypes.index(dtype)
        slots.append((buf, offsets[buf], tuple(leaf.shape)))
        parts[buf].append(jnp.ravel(leaf))
        offsets[buf] += math.prod(leaf.shape)
    buffers = tuple(jnp.concatenate(p) if len(p) > 1 else p[0] for p in parts)
    return PackedCarry(buffers, CarryLayout(treedef, tuple(dtypes), tuple(slots)))


def call_with_carry(fn, carry, *args):
    """`fn(carry, *args) -> (carry, y)`, with a `PackedCarry` unpacked before and the next carry
    packed after (inside a traced function, this costs static slices and one concatenation per
    dtype)."""
    if not isinstance(carry, PackedCarry):
        return fn(carry, *args)
    carry, y = fn(carry.unpack(), *args)
    return pack_carry(carry), y
