"""The shipped ASR checkpoint: a single `.npz` of float32 arrays plus a JSON config, loaded
without orbax.

    model = load_pretrained()                 # streamzoo/zoo/asr/weights/asr_ctc_small.*
    text = transcribe(model, [audio])[0]      # streamzoo.zoo.asr.model

`export_pretrained(model, path, extra)` writes `path.npz` (every variable of the model:
parameters and the frozen log-mel statistics, keyed by their nnx path) and `path.json`
(`{"model": ASRConfig.to_dict(), ...extra}`, e.g. training facts and measured figures).
`export_from_run(run_dir, path)` does it for the latest orbax checkpoint of a training run.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from streamzoo.zoo.asr.model import ASRConfig, ASRModel
from streamzoo.zoo.weights import load_state_arrays, state_arrays

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
DEFAULT_NAME = "asr_ctc_small"


def default_path() -> str:
    """The shipped checkpoint's path stem (without `.npz` / `.json`)."""
    return os.path.join(WEIGHTS_DIR, DEFAULT_NAME)


def export_pretrained(model: ASRModel, path: str, extra: dict | None = None) -> tuple[str, str]:
    """Write `path.npz` and `path.json`; returns both file names."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    npz, js = f"{path}.npz", f"{path}.json"
    np.savez_compressed(npz, **state_arrays(model))
    with open(js, "w") as f:
        json.dump({"model": model.config.to_dict(), **(extra or {})}, f, indent=1)
    return npz, js


def load_pretrained(path: str | None = None) -> ASRModel:
    """The model of `path.npz` + `path.json` (default: the shipped checkpoint)."""
    path = default_path() if path is None else path
    if path.endswith(".npz") or path.endswith(".json"):
        path = path.rsplit(".", 1)[0]
    npz, js = f"{path}.npz", f"{path}.json"
    for f in (npz, js):
        if not os.path.exists(f):
            raise ValueError(f"path: expected {f} to exist (a checkpoint written by "
                             f"export_pretrained), got none")
    with open(js) as f:
        config = ASRConfig.from_dict(json.load(f)["model"])
    model = nnx.eval_shape(lambda: ASRModel(config, rngs=nnx.Rngs(0)))  # no random init
    with np.load(npz) as data:
        load_state_arrays(model, dict(data), what=npz)
    return model


def pretrained_info(path: str | None = None) -> dict:
    """The JSON side of a checkpoint (config plus the training facts stored with it)."""
    path = default_path() if path is None else path
    with open(f"{path}.json") as f:
        return json.load(f)


def model_from_run(run_dir: str, step: int | None = None) -> tuple[ASRModel, int, dict]:
    """`(model, step, train config dict)` of a training run's latest (or `step`) checkpoint."""
    from streamzoo.train.checkpoint import Checkpointer
    from streamzoo.train.configs import TrainConfig
    from streamzoo.train.loop import TrainState
    from streamzoo.zoo.asr.training import DEFAULTS, model_config

    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = TrainConfig.from_dict(json.load(f))
    args = {**DEFAULTS, **cfg.model_args}
    model = ASRModel(model_config(args), rngs=nnx.Rngs(0))
    from streamzoo.train.loop import make_optimizer
    tx, _ = make_optimizer(cfg.learning_rate, cfg.num_steps,
                           warmup_steps=min(cfg.warmup_steps, cfg.num_steps - 1),
                           end_lr_ratio=cfg.end_lr_ratio, weight_decay=cfg.weight_decay,
                           clip_norm=cfg.clip_norm)
    state = TrainState.create(model, tx, lambda m, b, r: (0.0, {}))
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        state, _ = ckpt.restore(state, step=step)
    model = state.model()
    return model, int(state.step), cfg.to_dict()


def export_from_run(run_dir: str, path: str | None = None, extra: dict | None = None):
    """Export the latest checkpoint of `run_dir` to `path` (default: the shipped one)."""
    model, step, cfg = model_from_run(run_dir)
    return export_pretrained(model, default_path() if path is None else path,
                             {"train_step": step, "train_config": cfg, **(extra or {})})


__all__ = ["WEIGHTS_DIR", "default_path", "export_from_run", "export_pretrained",
           "load_pretrained", "model_from_run", "pretrained_info"]
