"""Checkpoints of a `TrainState` with orbax's `CheckpointManager`.

One checkpoint holds the items `state` (params, optimizer state, step, PRNG key data and
optionally the state's live stream carry; orbax `StandardSave`), optionally `carries` (extra
stream carries, e.g. of live serving sessions) and `meta` (JSON: format version, step, the
PRNG implementation, the data-iterator position, the run config and a fingerprint of every
array's path, shape and dtype). Saves are asynchronous
(the arrays are copied off the device before `save` returns, so the next, donating train
step cannot corrupt them) and old steps are pruned by `max_to_keep`. A step directory only
counts once orbax has committed it, so a process killed mid-save resumes from the previous
complete checkpoint.

Restoring always goes against an abstract target built from the *current* state
(`ShapeDtypeStruct`s that keep each array's sharding), so optax NamedTuples and nnx.State
come back as such and arrays land on the current devices / mesh. Before any array is read,
the stored fingerprint and config are compared with the current ones; a checkpoint of
another model, optimizer or config raises a ValueError that names what differs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

FORMAT_VERSION = 1
IDENTITY_KEYS = ("model", "model_args")
"""Config entries that must match between a checkpoint and the run restoring it."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a restore returns besides the state."""

    step: int
    data_state: Any        # the data iterator's position (JSON), or None
    config: dict | None    # the config stored with the checkpoint
    carries: Any           # the extra carries restored (when a template was given), or None
    meta: dict             # the whole JSON metadata


def tree_fingerprint(tree) -> dict[str, str]:
    """`{path: "dtype[shape]"}` for every array leaf (works on ShapeDtypeStructs too)."""
    return {jax.tree_util.keystr(path): f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)}"
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _key_impl_name(key) -> str:
    return str(jax.random.key_impl(key))


def _payload(state) -> dict:
    """The arrays of the `state` item (PRNG keys as raw key data)."""
    payload = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
               "rng": jax.random.key_data(state.rng)}
    if jax.tree_util.tree_leaves(state.model_state):
        payload["model_state"] = state.model_state
    if state.carry is not None:
        payload["carry"] = state.carry
    return payload


def _fingerprint(state, carries) -> dict[str, str]:
    tree = _payload(state)
    if carries is not None:
        tree["carries"] = carries
    return tree_fingerprint(tree)


def _abstract(tree):
    """ShapeDtypeStructs (keeping shardings) of a tree of arrays."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _describe_differences(stored: Mapping[str, str], current: Mapping[str, str], limit=8) -> str:
    order = ("['params']", "['model_state']", "['step']", "['rng']", "['carry']", "['carries']",
             "['opt_state']")
    rank = lambda p: next((i for i, o in enumerate(order) if p.startswith(o)), len(order))
    lines = []
    for path in sorted(set(stored) | set(current), key=lambda p: (rank(p), p)):
        s, c = stored.get(path), current.get(path)
        if s == c:
            continue
        if s is None:
            lines.append(f"  {path}: not in the checkpoint (current {c})")
        elif c is None:
            lines.append(f"  {path}: only in the checkpoint ({s})")
        else:
            lines.append(f"  {path}: checkpoint {s}, current {c}")
    more = len(lines) - limit
    return "\n".join(lines[:limit] + ([f"  ... and {more} more"] if more > 0 else []))


class Checkpointer:
    """A training run's checkpoints in `directory` (async orbax saves, `max_to_keep` kept).

    `save(state, ...)` stores a `TrainState`; `restore(state, ...)` returns the stored one,
    restored against `state` as the abstract target. Use as a context manager, or call
    `close()` (which waits for pending saves).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, identity_keys: tuple[str, ...] = IDENTITY_KEYS):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep: expected None or a positive int, got {max_to_keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.identity_keys = tuple(identity_keys)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------------- queries
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (default: the latest)."""
        step = self._resolve(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _resolve(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(f"directory: expected a checkpoint in {self.directory}, found none")
        elif step not in self.all_steps():
            raise ValueError(f"step: expected one of the saved steps {self.all_steps()}, got {step}")
        return step

    # ---------------------------------------------------------------------------- save
    def save(self, state, *, data_state: Any = None, config: Mapping | None = None,
             carries: Any = None, force: bool = False) -> bool:
        """Save `state` at `int(state.step)` (asynchronously); returns whether it saved.

        data_state: the data iterator's position (JSON-able, e.g. grain's `get_state()`).
        config: the run's config (JSON-able); its `identity_keys` are checked on restore.
        carries: extra stream carries (any pytree of arrays) to keep with the checkpoint.
        A step that is already saved is skipped (returns False).
        """
        step = int(jax.device_get(state.step))
        if step in self.all_steps():
            return False
        payload = _payload(state)
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "model": _model_name(state),
            "rng_impl": _key_impl_name(state.rng),
            "data_state": data_state,
            "config": dict(config) if config is not None else None,
            "fingerprint": _fingerprint(state, carries),
        }
        items = {"state": ocp.args.StandardSave(payload), "meta": ocp.args.JsonSave(meta)}
        if carries is not None:
            items["carries"] = ocp.args.StandardSave(carries)
        return bool(self.manager.save(step, args=ocp.args.Composite(**items), force=force))

    # ------------------------------------------------------------------------- restore
    def check_compatible(self, state, *, step: int | None = None, config: Mapping | None = None,
                         carries: Any = None) -> dict:
        """Raise a ValueError unless checkpoint `step` fits `state` (and `config`); returns meta."""
        step = self._resolve(step)
        meta = self.read_meta(step)
        where = f"checkpoint {os.path.join(self.directory, str(step))}"
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{where}: expected format {FORMAT_VERSION}, got {meta.get('format')!r}")
        stored_cfg, problems = meta.get("config"), []
        if config is not None and stored_cfg is not None:
            for key in self.identity_keys:
                if stored_cfg.get(key) != config.get(key):
                    problems.append(f"  config[{key!r}]: checkpoint {stored_cfg.get(key)!r}, "
                                    f"current {config.get(key)!r}")
        if meta.get("model") != _model_name(state):
            problems.append(f"  model: checkpoint {meta.get('model')}, current {_model_name(state)}")
        stored = dict(meta.get("fingerprint", {}))
        current = _fingerprint(state, carries)
        if carries is None:  # extra carries are optional on restore
            stored = {p: v for p, v in stored.items() if not p.startswith("['carries']")}
        diff = _describe_differences(stored, current)
        if diff:
            problems.append(diff)
        if problems:
            raise ValueError(
                f"{where} does not match the current state (a checkpoint of another model, "
                "optimizer or config, or carries of another shape):\n" + "\n".join(problems))
        return meta

    def restore(self, state, *, step: int | None = None, config: Mapping | None = None,
                carries: Any = None):
        """`(state, Restored)`: checkpoint `step` (default latest) restored against `state`.

        `state` is the current TrainState (fresh model and optimizer): its structure, shapes,
        dtypes and shardings form the abstract target. `carries`: a template (e.g. from
        `model.init_carry` or `jax.eval_shape`) to restore extra carries saved with `save`.
        """
        step = self._resolve(step)
        meta = self.check_compatible(state, step=step, config=config, carries=carries)
        items = {"state": ocp.args.StandardRestore(_abstract(_payload(state)))}
        if carries is not None:
            items["carries"] = ocp.args.StandardRestore(_abstract(carries))
        restored_items = self.manager.restore(step, args=ocp.args.Composite(**items))
        out = restored_items["state"]
        rng = jax.random.wrap_key_data(out["rng"], impl=meta["rng_impl"])
        restored = state.replace(step=out["step"], params=out["params"], opt_state=out["opt_state"],
                                 rng=rng, model_state=out.get("model_state", state.model_state),
                                 carry=out.get("carry", None))
        return restored, Restored(step=step, data_state=meta.get("data_state"),
                                  config=meta.get("config"),
                                  carries=restored_items["carries"] if carries is not None else None,
                                  meta=meta)

    # ---------------------------------------------------------------------- lifecycle
    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _model_name(state) -> str:
    """The class name of the state's root module (from its graphdef)."""
    graphdef = state.graphdef
    node = getattr(graphdef, "nodes", None)
    if node:
        typ = getattr(node[0], "type", None)
        if typ is not None:
            return f"{typ.__module__}.{typ.__qualname__}"
    typ = getattr(graphdef, "type", None)
    return f"{typ.__module__}.{typ.__qualname__}" if typ is not None else type(graphdef).__name__
