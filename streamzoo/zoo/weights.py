"""Model variables as a flat `{name: array}` dict: the `.npz` form of every checked-in model.

A name is the variable's path in the module joined by "/" (`blocks/layers/attn/qkv/kernel`), as
in `nnx.to_pure_dict`. `load_state_arrays` fills a model, typically an `nnx.eval_shape` one so
that nothing is initialised only to be overwritten, and checks that the names, shapes and
dtypes match exactly, naming the first differences.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


def _flatten(pure: dict, prefix: str = "") -> dict[str, tuple[dict, object]]:
    """`{name: (parent dict, key)}` for every leaf of a pure dict."""
    out = {}
    for key, node in pure.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(node, dict):
            out.update(_flatten(node, name))
        else:
            out[name] = (pure, key)
    return out


def state_arrays(model: nnx.Module, *filters) -> dict[str, np.ndarray]:
    """The variables of `model` selected by `filters` (default: all) as `{name: numpy array}`."""
    pure = nnx.to_pure_dict(nnx.state(model, *filters))
    return {name: np.asarray(parent[key]) for name, (parent, key) in _flatten(pure).items()}


def load_state_arrays(model: nnx.Module, arrays: Mapping[str, np.ndarray], *filters,
                      what: str = "arrays") -> None:
    """Set the variables of `model` selected by `filters` (default: all) from `arrays` (as
    written by `state_arrays`). `what` names the source in errors (e.g. the file)."""
    state = nnx.state(model, *filters)
    pure = nnx.to_pure_dict(state)
    slots = _flatten(pure)
    missing, unexpected = sorted(set(slots) - set(arrays)), sorted(set(arrays) - set(slots))
    if missing or unexpected:
        raise ValueError(f"{what}: expected exactly the model's variables; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, (parent, key) in slots.items():
        want, got = parent[key], np.asarray(arrays[name])
        if tuple(got.shape) != tuple(want.shape) or got.dtype != np.dtype(want.dtype):
            raise ValueError(f"{what}: {name}: expected shape {tuple(want.shape)} and dtype "
                             f"{np.dtype(want.dtype)}, got shape {tuple(got.shape)} and dtype "
                             f"{got.dtype}")
        parent[key] = jnp.asarray(got)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


__all__ = ["load_state_arrays", "state_arrays"]
