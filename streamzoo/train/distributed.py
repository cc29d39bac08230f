"""Multi-process launch: `initialize()` around `jax.distributed.initialize`, and per-process data.

One process per host (or per GPU under SLURM) runs the same program; `initialize()` must run
before anything touches a jax backend. It finds the cluster from the environment:

* explicit: `STREAMZOO_COORDINATOR_ADDRESS=host:port STREAMZOO_NUM_PROCESSES=N
  STREAMZOO_PROCESS_ID=i` (or jax's `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`), or the same as arguments;
* SLURM (`srun`): coordinator = first host of the step's node list, port from the job id (as
  jax computes it; `JAX_COORDINATOR_PORT` overrides), one GPU per task when a node runs
  several tasks, all the node's GPUs when it runs one;
* Open MPI (`mpirun`): `OMPI_COMM_WORLD_*`, handed to jax's own detection;
* Cloud TPU pods (`TPU_WORKER_HOSTNAMES`, `MEGASCALE_*` or a TPU VM with libtpu): jax's
  own detection through the TPU metadata;
* otherwise a single process: nothing to initialise.

After it, `jax.devices()` lists every process's devices, `jax.process_index()` /
`jax.process_count()` say who is who, and the helpers below split the data: each process
loads only its slice of the global batch and `global_batch` assembles the global arrays.
See docs/multihost.md for the exact launch commands.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ENV_PREFIXES = ("STREAMZOO_", "JAX_")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where this process sits: `kind` is single, explicit, slurm, mpi or tpu.

    Fields left `None` are found by jax's own cluster detection (mpi, tpu).
    """

    kind: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def is_multi_process(self) -> bool:
        return self.kind != "single"


# ------------------------------------------------------------------------------ parsing
def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


def _first_env(env: Mapping[str, str], suffix: str) -> str | None:
    for prefix in ENV_PREFIXES:
        if env.get(prefix + suffix):
            return prefix + suffix
    return None


def first_slurm_host(node_list: str) -> str:
    """The first host of a SLURM node list: `node[003-007,9],gpu1` -> `node003`."""
    node_list = node_list.strip()
    match = re.match(r"([^,\[]+)(\[([^\]]*)\])?", node_list)
    if not node_list or not match:
        raise ValueError(f"SLURM_STEP_NODELIST: expected a node list like 'node[001-004]', "
                         f"got {node_list!r}")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges)[0]
    return prefix + first


def slurm_tasks_per_node(env: Mapping[str, str]) -> int | None:
    """Tasks on this node: `SLURM_NTASKS_PER_NODE`, or the first entry of
    `SLURM_STEP_TASKS_PER_NODE` / `SLURM_TASKS_PER_NODE` (format `8(x2),4`)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _env_int(env, "SLURM_NTASKS_PER_NODE")
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        raw = env.get(name)
        if raw:
            match = re.match(r"(\d+)", raw)
            if not match:
                raise ValueError(f"{name}: expected a list like '8(x2),4', got {raw!r}")
            return int(match.group(1))
    return None


def _slurm_gpus_on_node(env: Mapping[str, str]) -> int | None:
    if env.get("SLURM_GPUS_ON_NODE"):
        return _env_int(env, "SLURM_GPUS_ON_NODE")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    return None


def _looks_like_tpu(env: Mapping[str, str]) -> bool:
    if any(env.get(name) for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                                      "MEGASCALE_COORDINATOR_ADDRESS")):
        return True
    has_libtpu = importlib.util.find_spec("libtpu") is not None
    return has_libtpu and (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))


def detect_cluster(env: Mapping[str, str] | None = None) -> ClusterSpec:
    """The cluster this process runs in, read from `env` (default `os.environ`)."""
    env = os.environ if env is None else env
    address = _first_env(env, "COORDINATOR_ADDRESS")
    if address:
        count, pid = _first_env(env, "NUM_PROCESSES"), _first_env(env, "PROCESS_ID")
        if not count or not pid:
            raise ValueError(f"{address}: set, so STREAMZOO_NUM_PROCESSES and "
                             f"STREAMZOO_PROCESS_ID must be set too (got "
                             f"{count or 'no process count'}, {pid or 'no process id'})")
        spec = ClusterSpec("explicit", env[address], _env_int(env, count), _env_int(env, pid))
        _check_spec(spec)
        return spec
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS"):
        tasks = _env_int(env, "SLURM_NTASKS")
        if tasks > 1:
            node_list = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not node_list:
                raise ValueError("SLURM_STEP_NODELIST: expected the step's node list "
                                 "(run the program under srun), got nothing")
            port = env.get("JAX_COORDINATOR_PORT") or str(
                _env_int(env, "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1))
            per_node = slurm_tasks_per_node(env)
            local = None
            if per_node is not None and per_node > 1 and env.get("SLURM_LOCALID"):
                local = (_env_int(env, "SLURM_LOCALID"),)   # one GPU per task
            elif per_node == 1 and (gpus := _slurm_gpus_on_node(env)):
                local = tuple(range(gpus))                   # one task drives the node
            spec = ClusterSpec("slurm", f"{first_slurm_host(node_list)}:{port}", tasks,
                               _env_int(env, "SLURM_PROCID"), local)
            _check_spec(spec)
            return spec
    if env.get("OMPI_COMM_WORLD_SIZE") and _env_int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return ClusterSpec("mpi")
    if _looks_like_tpu(env):
        return ClusterSpec("tpu")
    return ClusterSpec("single", None, 1, 0)


def _check_spec(spec: ClusterSpec) -> None:
    if spec.num_processes is not None and spec.num_processes < 1:
        raise ValueError(f"num_processes: expected >= 1, got {spec.num_processes}")
    if spec.process_id is not None and not 0 <= spec.process_id < (spec.num_processes or 1):
        raise ValueError(f"process_id: expected 0 <= process_id < {spec.num_processes}, "
                         f"got {spec.process_id}")
    if spec.coordinator_address is not None and not re.fullmatch(r".+:\d+",
                                                                  spec.coordinator_address):
        raise ValueError(f"coordinator_address: expected 'host:port', got "
                         f"{spec.coordinator_address!r}")


# --------------------------------------------------------------------------- initialise
def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               *, env: Mapping[str, str] | None = None, timeout_s: int = 300) -> ClusterSpec:
    """Join the multi-process run this process belongs to (no-op for a single process).

    Arguments override what the environment says. Call it first, before any jax
    computation or `jax.devices()`; calling it again after a successful call is a no-op.
    Returns the `ClusterSpec` used.
    """
    if coordinator_address is not None or num_processes is not None or process_id is not None:
        if None in (coordinator_address, num_processes, process_id):
            raise ValueError(
                "coordinator_address, num_processes, process_id: expected all three or none, got "
                f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
        spec = ClusterSpec("explicit", coordinator_address, int(num_processes), int(process_id),
                           None if local_device_ids is None else tuple(local_device_ids))
        _check_spec(spec)
    else:
        spec = detect_cluster(env)
        if local_device_ids is not None:
            spec = dataclasses.replace(spec, local_device_ids=tuple(local_device_ids))
    if not spec.is_multi_process or jax.distributed.is_initialized():
        return spec
    kwargs = dict(coordinator_address=spec.coordinator_address,
                  num_processes=spec.num_processes, process_id=spec.process_id,
                  local_device_ids=None if spec.local_device_ids is None
                  else list(spec.local_device_ids),
                  initialization_timeout=timeout_s)
    if spec.kind in ("explicit", "slurm"):
        # Everything is known: no second guess by jax's detection (which would pin SLURM
        # tasks to one GPU each even when a task should drive the whole node).
        kwargs["cluster_detection_method"] = "deactivate"
    jax.distributed.initialize(**kwargs)
    return spec


# ------------------------------------------------------------------------- data helpers
def process_batch_slice(global_batch_size: int, process_index: int | None = None,
                        process_count: int | None = None) -> slice:
    """The rows of a global batch that process `process_index` loads (contiguous, equal)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size: expected a positive int, got {global_batch_size!r}")
    if global_batch_size % count:
        raise ValueError(f"global_batch_size: expected a multiple of the process count {count}, "
                         f"got {global_batch_size}")
    if not 0 <= index < count:
        raise ValueError(f"process_index: expected 0 <= index < {count}, got {index}")
    size = global_batch_size // count
    return slice(index * size, (index + 1) * size)


def process_indices(num_examples: int, process_index: int | None = None,
                    process_count: int | None = None, *, drop_remainder: bool = True) -> np.ndarray:
    """The example indices this process reads: every `count`-th one from `index`, so each
    process gets the same number (the last `num_examples % count` dropped unless asked)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index: expected 0 <= index < {count}, got {index}")
    stop = num_examples - num_examples % count if drop_remainder else num_examples
    return np.arange(index, stop, count)


def grain_shard_options(*, drop_remainder: bool = True):
    """`grain.sharding.ShardOptions` for this process (grain is imported only here)."""
    from grain.sharding import ShardOptions
    return ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count(),
                        drop_remainder=drop_remainder)


def global_batch(local_tree, mesh: Mesh, spec: P | None = None, *, axis: str = "data"):
    """Global arrays from each process's local rows (`jax.make_array_from_process_local_data`).

    Every leaf's leading axis is the batch, split over `axis` (or laid out by `spec`); the
    global batch is the concatenation of the processes' local batches in process order.
    """
    if spec is None:
        if axis not in mesh.shape:
            raise ValueError(f"axis: expected a mesh axis of {tuple(mesh.shape)}, got {axis!r}")
        spec = P(axis)
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                        local_tree)


# ------------------------------------------------------------------------------ check
def check(global_batch_size: int = 8) -> str:
    """One all-reduce over every device of every process; returns a line describing it.

    Each process contributes its slice of `arange(global_batch_size * 3)`; the global sum
    computed by a jitted reduction and by a `shard_map` psum must both equal the total.
    """
    from streamzoo.train.sharding import make_mesh  # here: sharding imports flax

    mesh = make_mesh({"data": jax.device_count()})
    rows = process_batch_slice(global_batch_size)
    data = np.arange(global_batch_size * 3, dtype=np.float32).reshape(global_batch_size, 3)
    batch = global_batch(data[rows], mesh)
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(batch)
    psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x.sum(), "data"), mesh=mesh,
                                 in_specs=P("data"), out_specs=P()))(batch)
    expected = float(data.sum())
    ok = float(total) == expected and float(psum) == expected
    return (f"process {jax.process_index()}/{jax.process_count()}: "
            f"{jax.local_device_count()} local of {jax.device_count()} devices "
            f"({jax.devices()[0].platform}), global batch {tuple(batch.shape)}, "
            f"sum {float(total)} psum {float(psum)} expected {expected}: "
            f"{'OK' if ok else 'MISMATCH'}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m streamzoo.train.distributed`: join the run and check one all-reduce."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m streamzoo.train.distributed",
        description="Join the multi-process run described by the environment (see "
                    "docs/multihost.md) and check an all-reduce across all processes.")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="simulate this many CPU devices per process (testing on one machine)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="rows of the test batch (default: 2 per device)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds to wait for peers")
    args = parser.parse_args(argv)
    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            raise ValueError(f"--cpu-devices: expected a positive int, got {args.cpu_devices}")
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    spec = initialize(timeout_s=args.timeout)
    print(f"cluster: {spec}", flush=True)
    line = check(args.global_batch or 2 * jax.device_count())
    print(line, flush=True)
    if spec.is_multi_process:
        jax.distributed.shutdown()
    return 0 if line.endswith("OK") else 1


__all__ = ["ClusterSpec", "detect_cluster", "first_slurm_host", "slurm_tasks_per_node",
           "initialize", "process_batch_slice", "process_indices", "grain_shard_options",
           "global_batch", "check", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
