"""Sharding of parameters, optimizer states, carries and batches by *logical* axis names.

Every array axis gets a logical name (`batch`, `embed`, `mlp`, `heads`, `kv_len`, `layers`,
...); a rule table maps logical names to mesh axes, one table per strategy (data parallel,
FSDP, tensor parallel, DP x TP, FSDP x TP). Models never mention mesh axes, so one model runs
under every strategy, and a strategy is a table, not code.

* Parameters: names are derived from the module graph (an `nnx.Linear` kernel is
  `(embed, mlp)`, or `(mlp, embed)` for an output projection such as `down`/`out_proj`; a
  norm scale is `(embed,)`; each enclosing `Repeat` adds a leading `layers` axis). A
  parameter created with flax's `out_sharding=(...)` metadata keeps the names it declares.
* Carries: the leading axis is `batch` (`[L, B, ...]` under a `RepeatCarry`); a carry
  dataclass may name every axis of its fields with a class attribute
  `logical_axes = {"k": ("batch", "kv_len", "kv_heads", "head_dim"), ...}`.
* Batches: `[B, T, ...]` is `(batch, time, ...)`.

A rule maps a logical name to a mesh axis (or a tuple of axes). Rules are tried in table
order; a mesh axis is used at most once per array, a rule is skipped when its mesh axis is
not in the mesh or does not divide the dimension, so a table works on any mesh shape and
any model (an undivisible axis is replicated, never an error).

`jax.jit(step, in_shardings=..., out_shardings=...)` with these shardings is the current form
of pjit (GSPMD inserts the collectives; use `make_mesh`, whose axes are `Auto`: with jax's
default `Explicit` axes a matmul contracting a sharded axis fails at trace time). Where the
collectives should be explicit, `data_parallel_step` is a `jax.shard_map` train step whose
gradients are averaged with an explicit `pmean`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from streamzoo.core.combinators import Repeat, RepeatCarry

# ------------------------------------------------------------------------- logical names
BATCH = "batch"        # rows of a batch / streams of a carry
TIME = "time"          # frames of a sequence
EMBED = "embed"        # model width of parameters (d_model)
CHANNELS = "channels"  # per-frame features of activations and carries (conv buffers, states)
MLP = "mlp"            # hidden width of feed-forwards, recurrences, projections
HEADS = "heads"        # query heads (or a fused heads*head_dim axis)
KV_HEADS = "kv_heads"  # key/value heads
HEAD_DIM = "head_dim"
KV_LEN = "kv_len"      # slots of a KV cache
VOCAB = "vocab"
LAYERS = "layers"      # the stacked axis of `Repeat` parameters and carries

LOGICAL_AXES = (BATCH, TIME, EMBED, CHANNELS, MLP, HEADS, KV_HEADS, HEAD_DIM, KV_LEN, VOCAB,
                LAYERS)

Rules = tuple[tuple[str, Any], ...]

# --------------------------------------------------------------------------- rule tables
# Mesh axes: "data" (batch / FSDP), "model" (tensor parallel), "seq" (context parallel).
DATA_PARALLEL: Rules = ((BATCH, "data"),)
"""Parameters replicated, batch and carries split over `data`."""

FSDP: Rules = ((BATCH, "data"), (EMBED, "data"), (MLP, "data"), (HEADS, "data"),
               (KV_HEADS, "data"), (VOCAB, "data"))
"""ZeRO-3 style: batch over `data`, and every parameter sharded over `data` too (on its
first divisible named axis); GSPMD all-gathers parameters for compute."""

TENSOR_PARALLEL: Rules = ((MLP, "model"), (HEADS, "model"), (KV_HEADS, "model"),
                          (VOCAB, "model"))
"""Megatron style: hidden, head and vocabulary axes over `model`; batch replicated."""

DP_TP: Rules = DATA_PARALLEL + TENSOR_PARALLEL
"""Batch over `data`, Megatron tensor parallelism over `model`."""

FSDP_TP: Rules = DATA_PARALLEL + TENSOR_PARALLEL + ((EMBED, "data"),)
"""Tensor parallel over `model`, the remaining parameter axis sharded over `data`."""

CONTEXT_PARALLEL: Rules = ((BATCH, "data"), (TIME, "seq"), (KV_LEN, "seq"))
"""Sequences split along time over `seq` (ring attention, sequence-parallel recurrences)."""

RULES: dict[str, Rules] = {"dp": DATA_PARALLEL, "fsdp": FSDP, "tp": TENSOR_PARALLEL,
                           "dp_tp": DP_TP, "fsdp_tp": FSDP_TP, "cp": CONTEXT_PARALLEL}

# Linear layers whose attribute name marks them as output projections ([hidden, embed]).
OUTPUT_PROJECTIONS = frozenset({"down", "out", "out_proj", "proj_out", "output", "o", "o_proj",
                                "wo", "w2", "fc2", "dense_out"})
ATTENTION_OUTPUTS = frozenset({"out", "o", "o_proj", "wo", "out_proj"})
ATTENTION_INPUTS = frozenset({"q", "k", "v", "qkv", "kv", "query", "key", "value", "q_proj",
                              "k_proj", "v_proj", "wq", "wk", "wv", "wqkv"})


# ------------------------------------------------------------------------------- meshes
def make_mesh(axes: Mapping[str, int], *, devices: Sequence[jax.Device] | None = None,
              explicit: bool = False) -> Mesh:
    """A mesh with named axes, e.g. `make_mesh({"data": 2, "model": 4})`.

    Axes are `AxisType.Auto` (GSPMD propagation) unless `explicit`; `devices` defaults to
    all devices of the default backend (pass `jax.devices("cpu")` to use fake CPU devices).
    """
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError(f"axes: expected a non-empty mapping name -> size, got {axes!r}")
    for name, size in axes.items():
        if not isinstance(name, str) or not isinstance(size, int) or size < 1:
            raise ValueError(f"axes: expected str -> positive int entries, got {name!r}: {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(axes.values())
    if needed != len(devices):
        raise ValueError(f"axes: mesh shape {dict(axes)} needs {needed} devices, "
                         f"got {len(devices)}")
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(tuple(axes.values()), tuple(axes.keys()),
                         axis_types=(kind,) * len(axes), devices=devices)


def rules_for(strategy: str | Rules) -> Rules:
    """A rule table by name (`dp`, `fsdp`, `tp`, `dp_tp`, `fsdp_tp`, `cp`), or the table itself."""
    if isinstance(strategy, str):
        if strategy not in RULES:
            raise ValueError(f"strategy: expected one of {sorted(RULES)}, got {strategy!r}")
        return RULES[strategy]
    return _check_rules(strategy)


def _check_rules(rules) -> Rules:
    try:
        rules = tuple((name, target) for name, target in rules)
    except (TypeError, ValueError):
        raise ValueError(f"rules: expected (logical name, mesh axis or None) pairs, got {rules!r}")
    for name, target in rules:
        targets = target if isinstance(target, tuple) else (target,)
        if not isinstance(name, str) or not all(t is None or isinstance(t, str) for t in targets):
            raise ValueError(f"rules: expected (str, str | tuple[str] | None) pairs, "
                             f"got ({name!r}, {target!r})")
    return rules


def logical_to_mesh(names: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> P:
    """The `PartitionSpec` of an array whose axes have logical `names`.

    Rules apply in table order; a rule is skipped when one of its mesh axes is missing from
    `mesh`, already used by this array, or (with `shape`) does not divide the dimension.
    """
    names = tuple(names)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"names: expected one logical name per axis of shape {tuple(shape)}, "
                         f"got {names}")
    spec: list = [None] * len(names)
    used: set[str] = set()
    for name, target in _check_rules(rules):
        if target is None or name not in names:
            continue
        axes = target if isinstance(target, tuple) else (target,)
        if any(a not in mesh.shape or a in used for a in axes):
            continue
        size = math.prod(mesh.shape[a] for a in axes)
        for i, n in enumerate(names):
            if n == name and spec[i] is None and (shape is None or shape[i] % size == 0):
                spec[i] = target
                used.update(axes)
                break
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


# -------------------------------------------------------------------- parameter names
def _key_name(key):
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def _normalise(path) -> tuple:
    """A jax key path as plain names, without a trailing Variable `.value`."""
    names = tuple(_key_name(k) for k in path)
    if names and names[-1] == "value":
        names = names[:-1]
    return names


def _linear_roles(attr: str) -> tuple[str, str]:
    attr = str(attr)
    if attr in ATTENTION_OUTPUTS:
        return HEADS, EMBED
    if attr in OUTPUT_PROJECTIONS:
        return MLP, EMBED
    if attr in ATTENTION_INPUTS:
        return EMBED, HEADS
    return EMBED, MLP


def _default_param_axes(parent, attr, name, ndim: int) -> tuple:
    """Logical names of an unstacked parameter from its owner's type and attribute name."""
    if isinstance(parent, nnx.Embed) and ndim == 2:
        return (VOCAB, EMBED)
    if isinstance(parent, (nnx.Linear, nnx.Conv, nnx.ConvTranspose)):
        inp, out = _linear_roles(attr)
        if name == "bias" and ndim == 1:
            return (out,)
        if ndim >= 2:
            return (None,) * (ndim - 2) + (inp, out)
    if ndim == 0:
        return ()
    if ndim == 1:
        return (EMBED,)
    return (None,) * (ndim - 2) + (EMBED, MLP)


def param_logical_axes(model: nnx.Module) -> dict[tuple, tuple]:
    """`{path: logical names}` for every array Variable of `model` (path as in `nnx.iter_graph`).

    Parameters get names from their declared `out_sharding` metadata or the defaults in the
    module docstring; other Variables (RNG state, statistics) are replicated (all `None`).
    Each enclosing `Repeat` adds a leading `layers` axis.
    """
    nodes = dict(nnx.iter_graph(model))
    axes = {}
    for path, node in nodes.items():
        if not isinstance(node, nnx.Variable):
            continue
        value = node.get_value() if hasattr(node, "get_value") else node.value
        if not hasattr(value, "ndim"):
            continue
        stacked = sum(1 for i in range(len(path)) if isinstance(nodes.get(path[:i]), Repeat)
                      and path[i] == "layers")
        base = value.ndim - stacked
        if not isinstance(node, nnx.Param):
            axes[path] = (None,) * value.ndim
            continue
        declared = node.get_metadata().get("out_sharding")
        if declared:
            declared = tuple(declared)
            if len(declared) == value.ndim:
                axes[path] = declared
                continue
            if len(declared) != base:
                where = "/".join(map(str, path))
                raise ValueError(
                    f"model/{where}: out_sharding {declared} names {len(declared)} axes, the "
                    f"parameter has {base} (shape {tuple(value.shape)}, {stacked} stacked)")
            axes[path] = (LAYERS,) * stacked + declared
            continue
        parent = nodes.get(path[:-1])
        attr = path[-2] if len(path) >= 2 else ""
        axes[path] = (LAYERS,) * stacked + _default_param_axes(parent, attr, path[-1], base)
    return axes


def _lookup(axes_by_path: dict, path: tuple, leaf):
    """The names of `leaf` at `path`; a suffix match finds params inside optimizer states."""
    ndim = getattr(leaf, "ndim", None)
    for start in range(len(path) + 1):
        names = axes_by_path.get(path[start:])
        if names is not None and len(names) == ndim:
            return names
    return None


def tree_logical_axes(tree, axes_by_path: dict):
    """`P(logical names...)` for each array leaf of `tree` (a model, its `nnx.State`, or an
    optimizer state built on either); leaves with no known name get all-`None`."""

    def one(path, leaf):
        if not hasattr(leaf, "ndim"):
            return None
        names = _lookup(axes_by_path, _normalise(path), leaf)
        return P(*(names if names is not None else (None,) * leaf.ndim))

    return jax.tree_util.tree_map_with_path(one, tree)


# ------------------------------------------------------------------------- carry names
def carry_logical_axes(carry):
    """`P(logical names...)` per array leaf of a carry.

    Leading axis `batch`; each enclosing `RepeatCarry` adds a leading `layers` axis; a carry
    dataclass may name all axes of a field with a `logical_axes` class attribute (a dict
    field name -> names of the unstacked leaf, batch included).
    """
    return _carry_axes(carry, 0, None)


def _carry_axes(node, stacked: int, declared):
    if isinstance(node, RepeatCarry):
        return RepeatCarry(_carry_axes(node.layers, stacked + 1, None))
    if hasattr(node, "ndim"):
        if declared is not None:
            if len(declared) + stacked != node.ndim:
                raise ValueError(f"carry: logical_axes {declared} name {len(declared)} axes, the "
                                 f"leaf has {node.ndim - stacked} (shape {tuple(node.shape)})")
            return P(*((LAYERS,) * stacked + tuple(declared)))
        if node.ndim <= stacked:
            return P(*((LAYERS,) * node.ndim))
        return P(*((LAYERS,) * stacked + (BATCH,) + (None,) * (node.ndim - stacked - 1)))
    if node is None or not jax.tree_util.tree_leaves(node):
        return node
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node)):
        return None  # a non-array leaf (a Python number): nothing to shard
    table = getattr(type(node), "logical_axes", None)
    table = table if isinstance(table, Mapping) else {}
    children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    out = []
    for path, child in children:
        field = _key_name(path[0]) if len(path) == 1 else None
        out.append(_carry_axes(child, stacked, table.get(field)))
    return jax.tree_util.tree_unflatten(treedef, out)


def batch_logical_axes(tree, *, time_axis: bool = True):
    """`P(batch, time, None...)` per array leaf (`P(batch, None...)` if not `time_axis`)."""

    def one(leaf):
        if not hasattr(leaf, "ndim"):
            return None
        names = [BATCH, TIME if time_axis else None][:leaf.ndim] + [None] * max(0, leaf.ndim - 2)
        return P(*names)

    return jax.tree.map(one, tree)


# -------------------------------------------------------------------------------- plans
def _is_spec(x):
    return isinstance(x, P)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh and a rule table: turns logical names into `NamedSharding` pytrees.

    `plan.params(model)` for the model pytree (or `plan.params(model, tree=state)` for its
    `nnx.State` or optimizer state), `plan.carry(carry)`, `plan.batch(x)`; `plan.put(tree,
    shardings)` places arrays. The shardings go to `jax.jit(in_shardings=, out_shardings=)`.
    """

    mesh: Mesh
    rules: Rules

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        object.__setattr__(self, "rules", rules_for(self.rules))

    # logical -> mesh
    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> P:
        return logical_to_mesh(names, self.rules, self.mesh, shape)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None):
        return NamedSharding(self.mesh, self.spec(names, shape))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def from_logical(self, logical_tree, tree):
        """NamedShardings for `tree` from a same-structured tree of logical `P(...)` leaves."""

        def one(names, leaf):
            if names is None or not hasattr(leaf, "shape"):
                return None if names is None else self.replicated()
            return self.sharding(tuple(names), leaf.shape)

        return jax.tree.map(one, logical_tree, tree, is_leaf=lambda x: x is None or _is_spec(x))

    # pytrees
    def params(self, model: nnx.Module, tree=None):
        """Shardings for `tree` (default: the model pytree itself; also its `nnx.State`, a
        gradient, or an optax state over either, whose scalar counters are replicated)."""
        tree = model if tree is None else tree
        logical = tree_logical_axes(tree, param_logical_axes(model))
        return self.from_logical(logical, tree)

    def carry(self, carry):
        return self.from_logical(carry_logical_axes(carry), carry)

    def batch(self, tree, *, time_axis: bool = True):
        return self.from_logical(batch_logical_axes(tree, time_axis=time_axis), tree)

    def put(self, tree, shardings):
        """`jax.device_put(tree, shardings)` (skips non-array leaves)."""
        return jax.device_put(tree, shardings)

    def abstract(self, tree, shardings):
        """`ShapeDtypeStruct`s carrying `shardings`: the restore target that places a
        checkpoint (saved under any mesh) onto this plan's mesh."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            tree, shardings)


# ------------------------------------------------------------- explicit-collective step
def data_parallel_step(loss_fn: Callable, optimizer, mesh: Mesh, *, axis: str = "data",
                       batch_specs=None, donate: bool = False):
    """A jitted `jax.shard_map` data-parallel train step with an explicit gradient `pmean`.

    `loss_fn(params, batch) -> scalar` is the mean loss over the *local* batch; every device
    holds a replica of `params` and `opt_state` and a `1/n` slice of the batch (leading axis
    split over `axis`; shards must be equally weighted for the mean of means to be the global
    mean). Returns `step(params, opt_state, batch) -> (params, opt_state, loss)`.
    """
    if axis not in mesh.shape:
        raise ValueError(f"axis: expected one of the mesh axes {tuple(mesh.shape)}, got {axis!r}")

    def local(params, opt_state, batch):
        # Parameters enter as device-varying so that the local gradient stays local; the
        # all-reduce is the explicit pmean below (no implicit psum from the transpose).
        varying = jax.tree.map(lambda p: jax.lax.pcast(p, axis, to="varying"), params)
        loss, grads = jax.value_and_grad(loss_fn)(varying, batch)
        grads = jax.lax.pmean(grads, axis)
        loss = jax.lax.pmean(loss, axis)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def step(params, opt_state, batch):
        specs = batch_specs if batch_specs is not None else jax.tree.map(lambda _: P(axis), batch)
        mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), specs),
                               out_specs=(P(), P(), P()))
        return mapped(params, opt_state, batch)

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


__all__ = [
    "BATCH", "TIME", "EMBED", "CHANNELS", "MLP", "HEADS", "KV_HEADS", "HEAD_DIM", "KV_LEN",
    "VOCAB", "LAYERS", "LOGICAL_AXES", "DATA_PARALLEL", "FSDP", "TENSOR_PARALLEL", "DP_TP",
    "FSDP_TP", "CONTEXT_PARALLEL", "RULES", "ShardingPlan", "make_mesh", "rules_for",
    "logical_to_mesh", "param_logical_axes", "tree_logical_axes", "carry_logical_axes",
    "batch_logical_axes", "data_parallel_step",
]
