"""Fault tolerance: a training process killed with SIGKILL mid-run (after at least one
checkpoint) restarts from its last checkpoint and ends with bitwise the same parameters as a
run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fault_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, SAVE_EVERY = 16, 4


def worker_cmd(out, delay=0.0):
    return [sys.executable, WORKER, "--out", str(out), "--steps", str(STEPS),
            "--save-every", str(SAVE_EVERY), "--step-delay", str(delay)]


def worker_env():
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu",
                "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")})
    cache = jax.config.jax_compilation_cache_dir
    if cache:  # share the suite's persistent compilation cache: the runs compile the same step
        env.update({"JAX_COMPILATION_CACHE_DIR": cache,
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    return env


def committed_steps(run_dir) -> list[int]:
    """Checkpoint steps orbax has committed (in-progress saves live in `*.orbax-checkpoint-tmp*`)."""
    ckpt = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt):
        return []
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def run_to_end(out) -> list[str]:
    done = subprocess.run(worker_cmd(out), env=worker_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout.splitlines()


def load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_sigkill_mid_run_resumes_to_the_same_parameters(tmp_path):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    lines = run_to_end(reference_dir)
    assert lines[0] == "first step 1" and lines[-1] == "done"

    # Start the same run slowly and kill it between two checkpoints, once one is committed.
    proc = subprocess.Popen(worker_cmd(run_dir, delay=0.2), env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at, deadline = None, time.monotonic() + 180
    try:
        for line in proc.stdout:
            if time.monotonic() > deadline:
                break
            if line.startswith("step "):
                step = int(line.split()[1])
                saved = committed_steps(run_dir)
                if saved and step >= saved[-1] + 2 and step < STEPS:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
    assert killed_at is not None, f"the run ended before it could be killed:\n{err[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "final_params.npz").exists()
    last_saved = committed_steps(run_dir)[-1]
    assert 0 < last_saved < killed_at

    # Restart with the same command: it resumes from the last committed checkpoint.
    lines = run_to_end(run_dir)
    assert lines[0] == f"first step {last_saved + 1}", lines[:3]
    assert lines[-1] == "done"

    reference, resumed = load(reference_dir / "final_params.npz"), load(run_dir / "final_params.npz")
    assert reference.keys() == resumed.keys() and reference
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    # The metrics log reads as if the run never stopped: each step logged once.
    steps = [json.loads(l)["step"] for l in open(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))
