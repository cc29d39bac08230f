"""Batched, per-process sharded, checkpointable iteration over a random-access source (grain).

Every source in this package (`MovingDigits`, `SpeechExamples`, `TokenWindows`) is a
`Sequence` whose item i is a pure function of (seed, i). `make_batches` turns one into a
`grain.MapDataset` pipeline:

    source -> this process's shard -> shuffle(seed, reshuffled each epoch) -> repeat
           -> map(transform) -> batch

and `iter(...)` of it is a `grain.DatasetIterator` whose position is `it.get_state()`, a small
JSON dict (`{"next_index": k}`). That dict is what a checkpoint saves: with orbax pass
`grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)` as one item of
`ocp.args.Composite` (one `process_<i>-of-<n>.json` per process), or store the dict yourself and
call `it.set_state(state)`. Restoring gives bitwise the batches the run would have seen.

Sharding is by record: process i of n reads records `i, i + n, i + 2n, ...` of the first
`n * (len // n)` records, so every process has the same number of batches per epoch (the
last `len % n` records are left out; `shard_records` says how many). Batches are process-local:
`batch_size` is the per-process batch (`local_batch_size` divides a global one);
`jax.make_array_from_process_local_data` assembles the global array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax


def process_shard() -> tuple[int, int]:
    """`(shard_index, shard_count)` of this process: `jax.process_index()`, `.process_count()`."""
    return jax.process_index(), jax.process_count()


def local_batch_size(global_batch_size: int, shard_count: int | None = None) -> int:
    """The per-process batch for a global batch split evenly over `shard_count` processes."""
    shard_count = jax.process_count() if shard_count is None else shard_count
    if global_batch_size % shard_count:
        raise ValueError(f"global_batch_size: expected a multiple of the process count "
                         f"{shard_count}, got {global_batch_size}")
    return global_batch_size // shard_count


def shard_records(num_records: int, shard_index: int, shard_count: int) -> int:
    """How many records shard `shard_index` of `shard_count` holds (the same for all shards)."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index: expected 0 <= shard_index < shard_count, got "
                         f"shard_index={shard_index}, shard_count={shard_count}")
    return num_records // shard_count


def make_batches(source: Sequence, *, batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, shard_index: int | None = None,
                 shard_count: int | None = None, transform: Callable[[Any], Any] | None = None,
                 batch_fn: Callable[[Sequence[Any]], Any] | None = None,
                 drop_remainder: bool = True) -> grain.MapDataset:
    """A grain pipeline of batches over `source` (see the module docstring).

    `num_epochs=None` repeats forever. `shard_index`/`shard_count` default to this JAX process.
    `batch_fn` replaces grain's stacking (e.g. `pad_speech_batch` for ragged audio). With
    `drop_remainder` (default) every batch has exactly `batch_size` rows, so shapes are static.
    """
    if shard_index is None or shard_count is None:
        own_index, own_count = process_shard()
        shard_index = own_index if shard_index is None else shard_index
        shard_count = own_count if shard_count is None else shard_count
    per_shard = shard_records(len(source), shard_index, shard_count)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if drop_remainder and per_shard < batch_size:
        raise ValueError(f"batch_size: expected <= the {per_shard} records of shard "
                         f"{shard_index}/{shard_count} (len(source)={len(source)}), "
                         f"got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs: expected >= 1 or None (forever), got {num_epochs}")

    ds = grain.MapDataset.source(source)
    ds = ds[shard_index:per_shard * shard_count:shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if transform is not None:
        ds = ds.map(transform)
    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
