"""A training run for the fault test (`tests/train/test_fault.py`), run as a subprocess.

    python tests/train/_fault_worker.py --out DIR [--steps N] [--save-every K] [--step-delay S]

Trains the `predictor` model's `tiny` config in DIR with asynchronous checkpoints, resuming
from DIR's last checkpoint when there is one. Prints `first step N` (1 for a fresh run), then
`step N` after every step (sleeping `--step-delay` seconds, so that the test can kill it
mid-run), and at the end writes DIR/final_params.npz and prints `done`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args(argv)

    import numpy as np

    from streamzoo.train.configs import load_config, run
    from streamzoo.train.loop import params_to_numpy

    config = load_config("predictor", "tiny", [f"num_steps={args.steps}",
                                               f"save_every={args.save_every}",
                                               "eval_every=0", "max_to_keep=2"])
    first = []

    def on_step(step):
        if not first:
            first.append(step)
            print(f"first step {step}", flush=True)
        print(f"step {step}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)

    state = run(config, args.out, progress=False, plot=False, on_step=on_step)
    np.savez(os.path.join(args.out, "final_params.npz"), **params_to_numpy(state))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
