"""The Streamer protocol and `StreamLayer`, the base class that implements its common parts.

A Streamer is a `flax.nnx.Module` holding parameters only. Its carry is an explicit pytree
(a `flax.struct.dataclass`), so `step` is a pure function of `(module, carry, x)` and runs
under `jax.jit`, `vmap`, `lax.scan`, `grad` and `shard_map`.

`StreamLayer` validates inputs and carries (a `ValueError` at trace time that names the
argument, the expected and the actual value), compacts inputs for layers that look across
time, and supplies default `flush` (nothing held back) and `reset_rows` (rows re-initialised
from `init_carry`). Subclasses implement `_forward`, `_step`, `_init_carry` and `spec`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec

Carry = Any


@runtime_checkable
class Streamer(Protocol):
    """What every streamzoo layer and model implements (see DESIGN.md)."""

    @property
    def spec(self) -> StreamSpec: ...

    def init_carry(self, batch_size: int, dtype=None) -> Carry: ...

    def __call__(self, x: Seq) -> Seq: ...

    def step(self, carry: Carry, x: Seq) -> tuple[Carry, Seq]: ...

    def flush(self, carry: Carry) -> tuple[Carry, Seq]: ...

    def reset_rows(self, carry: Carry, rows: jax.Array) -> Carry: ...


@struct.dataclass
class NoCarry:
    """The carry of a stateless layer: no arrays, only the batch size it was made for."""

    batch_size: int = struct.field(pytree_node=False)


def batch_size_of(carry) -> int | None:
    """The batch size a carry was made for, or None when it cannot tell.

    A carry class may say it with a `batch_size` attribute (stacked carries do); otherwise it
    is the leading axis of its first leaf.
    """
    size = getattr(carry, "batch_size", None)
    if isinstance(size, int):
        return size
    leaves = jax.tree_util.tree_leaves(carry)
    return leaves[0].shape[0] if leaves and leaves[0].ndim else None


def where_rows(rows: jax.Array, new, old, batch_axis: int = 0):
    """Per leaf: `new` in the rows where `rows [B]` is True, `old` elsewhere."""

    def pick(n, o):
        shape = [1] * o.ndim
        shape[batch_axis] = rows.shape[0]
        return jnp.where(rows.reshape(shape), n.astype(o.dtype), o)

    return jax.tree.map(pick, new, old)


def _kind(dtype) -> str:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return "floating"
    if jnp.issubdtype(dtype, jnp.integer):
        return "integer"
    return str(dtype)


class StreamLayer(nnx.Module):
    """Base class: validation, compaction and the default `flush` / `reset_rows`.

    Subclasses set `in_features` / `out_features` (per-frame feature sizes; ints or shape
    tuples) and implement `spec`, `_init_carry`, `_forward` and `_step`. Set
    `frame_wise = True` for layers that act on each frame alone (norms, feed-forwards):
    they skip compaction (invalid frames are only zeroed) and keep the input's mask.
    """

    frame_wise: bool = False
    in_features: Any
    out_features: Any

    # --------------------------------------------------------------- shape helpers
    @property
    def input_frame_shape(self) -> tuple[int, ...]:
        f = self.in_features
        return tuple(f) if isinstance(f, (tuple, list)) else (f,)

    @property
    def output_frame_shape(self) -> tuple[int, ...]:
        f = self.out_features
        return tuple(f) if isinstance(f, (tuple, list)) else (f,)

    @property
    def spec(self) -> StreamSpec:
        return StreamSpec()

    # --------------------------------------------------------------------- public
    def init_carry(self, batch_size: int, dtype=None) -> Carry:
        """A fresh carry for `batch_size` streams; needs no parameter values."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        return self._init_carry(batch_size, dtype)

    def __call__(self, x: Seq) -> Seq:
        """Offline: the whole sequence at once (the training path)."""
        self.check_input(x, "x")
        return self._forward(x.masked() if self.frame_wise else x.compacted())

    def step(self, carry: Carry, x: Seq) -> tuple[Carry, Seq]:
        """Streaming: one chunk whose length is a multiple of `spec.block_size`."""
        self.check_input(x, "x")
        block = self.spec.block_size
        if x.length % block:
            raise ValueError(
                f"x: step input length must be a multiple of block_size={block}, "
                f"got T={x.length}")
        self.check_carry(carry, x.batch_size)
        return self._step(carry, x.masked() if self.frame_wise else x.compacted())

    def flush(self, carry: Carry) -> tuple[Carry, Seq]:
        """End of stream: emit what look-ahead still holds (nothing, by default)."""
        batch = batch_size_of(carry)
        if batch is None:
            raise ValueError("carry: cannot tell its batch size (expected a carry from init_carry)")
        self.check_carry(carry, batch)
        return self._flush(carry, batch)

    def reset_rows(self, carry: Carry, rows: jax.Array) -> Carry:
        """Re-initialise the rows where `rows [B]` is True; other rows are bitwise untouched."""
        rows = jnp.asarray(rows)
        batch = batch_size_of(carry)
        if rows.shape != (batch,) or rows.dtype != jnp.bool_:
            raise ValueError(
                f"rows: expected a bool array of shape ({batch},), got {rows.dtype}{list(rows.shape)}")
        self.check_carry(carry, batch)
        return self._reset_rows(carry, rows, batch)

    # -------------------------------------------------------- overridable defaults
    def _init_carry(self, batch_size: int, dtype) -> Carry:
        return NoCarry(batch_size)

    def _forward(self, x: Seq) -> Seq:
        raise NotImplementedError

    def _step(self, carry: Carry, x: Seq) -> tuple[Carry, Seq]:
        raise NotImplementedError

    def _flush(self, carry: Carry, batch_size: int) -> tuple[Carry, Seq]:
        if self.spec.output_latency:
            raise NotImplementedError(
                f"{type(self).__name__} has output_latency={self.spec.output_latency} "
                "and must implement _flush")
        return carry, Seq.empty(batch_size, self.output_frame_shape, self.output_dtype())

    def _reset_rows(self, carry: Carry, rows: jax.Array, batch_size: int) -> Carry:
        return where_rows(rows, self.init_carry(batch_size), carry)

    def output_dtype(self, input_dtype=jnp.float32):
        """The dtype of the output values for an input of `input_dtype`."""
        return getattr(self, "dtype", None) or input_dtype

    # ------------------------------------------------------------------ validation
    def check_input(self, x: Seq, name: str = "x") -> None:
        """Raise a ValueError naming `name` unless x is a Seq of this layer's frame shape."""
        if not isinstance(x, Seq):
            raise ValueError(f"{name}: expected a streamzoo.Seq, got {type(x).__name__}")
        expected = self.input_frame_shape
        if x.values.ndim != 2 + len(expected):
            raise ValueError(
                f"{name}: expected values of rank {2 + len(expected)} [B, T, {', '.join(map(str, expected))}], "
                f"got shape {tuple(x.values.shape)}")
        if x.frame_shape != expected:
            raise ValueError(
                f"{name}: expected feature shape {expected}, got {x.frame_shape} "
                f"(values shape {tuple(x.values.shape)})")
        if x.mask.shape != x.values.shape[:2]:
            raise ValueError(
                f"{name}.mask: expected shape {tuple(x.values.shape[:2])} [B, T], "
                f"got {tuple(x.mask.shape)}")
        if x.mask.dtype != jnp.bool_:
            raise ValueError(f"{name}.mask: expected dtype bool, got {x.mask.dtype}")
        kind = self.input_kind()
        if not jnp.issubdtype(x.values.dtype, kind):
            raise ValueError(
                f"{name}: expected {kind.__name__}-kind values, got dtype {x.values.dtype}")

    def input_kind(self):
        """The dtype kind the input values must have (floating unless overridden)."""
        return jnp.floating

    def check_carry(self, carry: Carry, batch_size: int, name: str = "carry") -> None:
        """Raise a ValueError unless `carry` has the structure and shapes of `init_carry`."""
        expected = jax.eval_shape(lambda: self.init_carry(batch_size))
        exp_def = jax.tree_util.tree_structure(expected)
        got_def = jax.tree_util.tree_structure(carry)
        if exp_def != got_def:
            raise ValueError(
                f"{name}: expected the carry structure of {type(self).__name__}.init_carry"
                f"({batch_size}) (a carry from another model or config?)\n"
                f"  expected: {exp_def}\n  got:      {got_def}")
        paths = jax.tree_util.tree_flatten_with_path(expected)[0]
        for (path, e), g in zip(paths, jax.tree_util.tree_leaves(carry)):
            where = f"{name}{jax.tree_util.keystr(path)}"
            if tuple(g.shape) != tuple(e.shape):
                raise ValueError(
                    f"{where}: expected shape {tuple(e.shape)} for batch size {batch_size}, "
                    f"got {tuple(g.shape)} (a carry of another batch size or config?)")
            if _kind(g.dtype) != _kind(e.dtype):
                raise ValueError(f"{where}: expected a {_kind(e.dtype)} dtype like {e.dtype}, got {g.dtype}")
