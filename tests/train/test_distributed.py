"""Multi-process launch helpers: cluster detection from the environment (explicit, SLURM,
Open MPI, TPU, single), argument checks, per-process data slices, and a real 2-process
`jax.distributed` run on 127.0.0.1 (CPU collectives over gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from streamzoo.train import distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SLURM = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
         "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[017-018,020],login1",
         "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}


def test_single_process_by_default():
    spec = dist.detect_cluster({})
    assert spec == dist.ClusterSpec("single", None, 1, 0) and not spec.is_multi_process
    assert dist.initialize(env={}) == spec  # no-op: nothing to join


def test_explicit_environment():
    env = {"STREAMZOO_COORDINATOR_ADDRESS": "10.0.0.1:1234", "STREAMZOO_NUM_PROCESSES": "4",
           "STREAMZOO_PROCESS_ID": "3"}
    assert dist.detect_cluster(env) == dist.ClusterSpec("explicit", "10.0.0.1:1234", 4, 3)
    jax_env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert dist.detect_cluster(jax_env).coordinator_address == "h:9"
    with pytest.raises(ValueError, match="STREAMZOO_PROCESS_ID"):
        dist.detect_cluster({"STREAMZOO_COORDINATOR_ADDRESS": "h:1",
                             "STREAMZOO_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="process_id"):
        dist.detect_cluster({**env, "STREAMZOO_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="STREAMZOO_NUM_PROCESSES"):
        dist.detect_cluster({**env, "STREAMZOO_NUM_PROCESSES": "four"})
    with pytest.raises(ValueError, match="host:port"):
        dist.detect_cluster({**env, "STREAMZOO_COORDINATOR_ADDRESS": "10.0.0.1"})


def test_slurm_one_task_per_gpu():
    spec = dist.detect_cluster(SLURM)
    port = 123456 % 4096 + 65535 - 4096 + 1  # jax's rule, so all tasks agree without talking
    assert spec == dist.ClusterSpec("slurm", f"gpu017:{port}", 16, 9, (1,))
    assert dist.detect_cluster({**SLURM, "JAX_COORDINATOR_PORT": "7777"}).coordinator_address \
        == "gpu017:7777"


def test_slurm_one_task_per_node_drives_all_its_gpus():
    env = {**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
           "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "8"}
    assert dist.detect_cluster(env).local_device_ids == tuple(range(8))
    # A single-task job is a single process.
    assert dist.detect_cluster({**SLURM, "SLURM_NTASKS": "1"}).kind == "single"


@pytest.mark.parametrize("node_list, first", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-015],host2", "node001"),
    ("node[007,009-015]", "node007"), ("a-b-c[3]", "a-b-c3")])
def test_first_slurm_host(node_list, first):
    assert dist.first_slurm_host(node_list) == first


def test_slurm_tasks_per_node_formats():
    assert dist.slurm_tasks_per_node({"SLURM_STEP_TASKS_PER_NODE": "4(x3),2"}) == 4
    assert dist.slurm_tasks_per_node({"SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert dist.slurm_tasks_per_node({}) is None
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        dist.slurm_tasks_per_node({"SLURM_TASKS_PER_NODE": "many"})


def test_mpi_and_tpu_are_left_to_jax_detection():
    assert dist.detect_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == dist.ClusterSpec("mpi")
    assert dist.detect_cluster({"OMPI_COMM_WORLD_SIZE": "1"}).kind == "single"
    assert dist.detect_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == dist.ClusterSpec("tpu")


def test_initialize_checks_its_arguments():
    with pytest.raises(ValueError, match="all three or none"):
        dist.initialize("127.0.0.1:1234", num_processes=2)
    with pytest.raises(ValueError, match="process_id"):
        dist.initialize("127.0.0.1:1234", num_processes=2, process_id=2)


def test_per_process_data_slices():
    slices = [dist.process_batch_slice(12, i, 3) for i in range(3)]
    assert slices == [slice(0, 4), slice(4, 8), slice(8, 12)]
    with pytest.raises(ValueError, match="global_batch_size"):
        dist.process_batch_slice(10, 0, 3)
    parts = [dist.process_indices(11, i, 3) for i in range(3)]
    assert all(len(p) == 3 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(9))
    assert len(dist.process_indices(11, 0, 3, drop_remainder=False)) == 4
    with pytest.raises(ValueError, match="process_index"):
        dist.process_indices(11, 3, 3)


def test_grain_shard_options_for_this_process():
    options = dist.grain_shard_options()
    assert (options.shard_index, options.shard_count, options.drop_remainder) == (0, 1, True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_share_one_global_batch():
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
    base.update({"JAX_PLATFORMS": "cpu", "STREAMZOO_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                 "STREAMZOO_NUM_PROCESSES": "2",
                 "PYTHONPATH": ROOT + os.pathsep + base.get("PYTHONPATH", "")})
    cmd = [sys.executable, "-m", "streamzoo.train.distributed", "--cpu-devices", "2",
           "--timeout", "60"]
    procs = [subprocess.Popen(cmd, cwd=ROOT,
                              env={**base, "STREAMZOO_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, out[-2000:] + err[-4000:]
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, out in enumerate(outputs):
        assert "cluster: ClusterSpec(kind='explicit'" in out, out
        assert (f"process {i}/2: 2 local of 4 devices (cpu), global batch (8, 3), "
                "sum 276.0 psum 276.0 expected 276.0: OK") in out, out
