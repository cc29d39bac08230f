"""Training configs, the registry of trainable models, and `streamzoo train <model> --config <name|file>`.

A `TrainConfig` is a flat dataclass of run settings plus `model_args` for the model builder;
it round-trips through JSON and is stored with every checkpoint. Models register a builder
with `@register_model(name)`: `builder(config) -> TrainTask` (module, loss function, data),
and named configs with `register_config(model, name, **overrides)`. Later issues add their
families (lm, asr, codec) the same way.

Registered here: `predictor`, a causal conv + LSTM + feed-forward next-frame predictor on a
real recording bundled with matplotlib (offline): a 4-channel EEG (`eeg.dat`, 800 frames;
the tiny configs) or a membrane potential (`membrane.dat`, 12000 frames; the small ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamzoo.core.combinators import Residual, Serial
from streamzoo.core.seq import Seq


# ------------------------------------------------------------------------------- config
@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs besides code; stored as JSON with its checkpoints.

    `warmup_steps` is capped at `num_steps - 1`; `tbptt_chunk` (frames) makes the loss go
    chunk by chunk through `model.step` with truncated BPTT; `compute_dtype` e.g. "bfloat16".
    """

    model: str = "predictor"
    model_args: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 32
    num_steps: int = 200
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    end_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    accum_steps: int = 1
    compute_dtype: str | None = None
    tbptt_chunk: int | None = None
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    max_to_keep: int = 3
    async_checkpointing: bool = True
    log_every: int = 1
    name: str = "default"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; expected some of {sorted(fields)}")
        return cls(**data)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


# ----------------------------------------------------------------------------- registry
@dataclasses.dataclass
class TrainTask:
    """What a model builder returns: the module, its loss and its data.

    train_data: an endless iterator of batches, ideally with `get_state()` / `set_state()`.
    eval_data: a zero-argument callable returning the evaluation batches (or None).
    carry: an initial stream carry when the loss trains with TBPTT across steps.
    """

    model: nnx.Module
    loss_fn: Callable
    train_data: Iterator
    eval_data: Callable[[], Iterable] | None = None
    carry: Any = None


MODELS: dict[str, Callable[[TrainConfig], TrainTask]] = {}
CONFIGS: dict[str, dict[str, dict]] = {}

# Families that register their models in their own `training` module, imported on first use
# of the registry (so importing streamzoo.train stays light).
FAMILY_TRAINING_MODULES = ("streamzoo.zoo.lm.training", "streamzoo.zoo.codec.training",
                           "streamzoo.zoo.asr.training")
_families_loaded = False


def load_families() -> None:
    """Import every family's `training` module that exists, so its models are registered."""
    global _families_loaded
    if _families_loaded:
        return
    _families_loaded = True
    import importlib
    import importlib.util
    for name in FAMILY_TRAINING_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) and importlib.util.find_spec(name):
            importlib.import_module(name)


def register_model(name: str):
    """Decorator: register `builder(config) -> TrainTask` under `name`."""

    def wrap(builder):
        if name in MODELS and MODELS[name] is not builder:
            raise ValueError(f"name: model {name!r} is already registered")
        MODELS[name] = builder
        CONFIGS.setdefault(name, {})
        return builder

    return wrap


def register_config(model: str, name: str, **overrides) -> None:
    """A named config of `model`: `overrides` applied to the TrainConfig defaults."""
    TrainConfig.from_dict({**overrides, "model": model})  # validate the keys now
    CONFIGS.setdefault(model, {})[name] = dict(overrides, model=model, name=name)


def _check_model(model: str) -> None:
    load_families()
    if model not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {model!r}")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ValueError(f"--set: expected KEY=VALUE (e.g. num_steps=100), got {item!r}")
    key, value = item.split("=", 1)
    target = data
    *parents, leaf = key.strip().split(".")
    for p in parents:
        target = target.setdefault(p, {})
        if not isinstance(target, dict):
            raise ValueError(f"--set: {key!r}: {p!r} is not a mapping")
    target[leaf] = _parse_value(value)


def load_config(model: str, config: str | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """The config of `model` named `config` (or read from a JSON file), then `KEY=VALUE` overrides.

    A JSON file holds TrainConfig keys; an optional `"base"` names the registered config it
    starts from. Keys in `model_args` may be set with dotted overrides (`model_args.hidden=32`).
    """
    _check_model(model)
    named = CONFIGS.get(model, {})
    if config is None:
        data = dict(named.get("default", {"model": model, "name": "default"}))
    elif config in named:
        data = dict(named[config])
    elif os.path.isfile(config):
        with open(config) as f:
            file_data = json.load(f)
        if not isinstance(file_data, dict):
            raise ValueError(f"config: expected a JSON object in {config}, got {type(file_data).__name__}")
        base = file_data.pop("base", None)
        if base is not None and base not in named:
            raise ValueError(f"config: 'base' in {config} expected one of {sorted(named)}, got {base!r}")
        data = dict(named.get(base, {}))
        data.update(file_data)
        data.setdefault("name", os.path.splitext(os.path.basename(config))[0])
        if data.setdefault("model", model) != model:
            raise ValueError(f"config: {config} is for model {data['model']!r}, not {model!r}")
    else:
        raise ValueError(f"config: expected a config name of {model!r} ({sorted(named)}) or a JSON "
                         f"file path, got {config!r}")
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        _apply_override(data, item)
    return TrainConfig.from_dict(data)


def build_task(config: TrainConfig) -> TrainTask:
    _check_model(config.model)
    return MODELS[config.model](config)


# ----------------------------------------------------------------- data: real time series
def eeg_series() -> np.ndarray:
    """A real 4-channel EEG recording, `[800, 4]` float32, each channel standardised.

    It ships with matplotlib (`mpl-data/sample_data/eeg.dat`, float64, 800 x 4), so it is
    available offline wherever matplotlib is installed.
    """
    return _standardised(_sample_data("eeg.dat", np.float64).reshape(800, 4))


def membrane_series() -> np.ndarray:
    """A real membrane-potential recording, `[12000, 1]` float32, standardised
    (matplotlib's `mpl-data/sample_data/membrane.dat`, float32)."""
    return _standardised(_sample_data("membrane.dat", np.float32).reshape(-1, 1))


SERIES = {"eeg": eeg_series, "membrane": membrane_series}


def _sample_data(name: str, dtype) -> np.ndarray:
    import matplotlib.cbook as cbook

    return np.fromfile(cbook.get_sample_data(name, asfileobj=False), dtype=dtype)


def _standardised(data: np.ndarray) -> np.ndarray:
    return ((data - data.mean(0)) / data.std(0)).astype(np.float32)


class WindowBatches:
    """Endless batches of random windows of a `[N, D]` series for next-frame prediction.

    Each batch: `inputs` = `Seq [B, L, D]` of frames t..t+L-1, `targets [B, L, D]` the
    frames t+1..t+L; each epoch visits every start position once in a seeded random order.
    With `min_length < L` every row also gets a random valid length (end padding), so the
    loss and the model see ragged rows. The position (`get_state` / `set_state`) is JSON:
    `{"epoch": e, "index": i}`.
    """

    def __init__(self, series: np.ndarray, batch_size: int, length: int, *, seed: int = 0,
                 min_length: int | None = None):
        series = np.asarray(series, np.float32)
        if series.ndim != 2 or series.shape[0] < length + 2:
            raise ValueError(f"series: expected [N, D] with N >= length + 2 = {length + 2}, "
                             f"got shape {series.shape}")
        self.series, self.batch_size, self.length, self.seed = series, batch_size, length, seed
        self.min_length = length if min_length is None else min_length
        if not 1 <= self.min_length <= length:
            raise ValueError(f"min_length: expected 1 <= min_length <= length={length}, got {min_length}")
        self.num_starts = series.shape[0] - length
        self.epoch, self.index = 0, 0

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"epoch", "index"}:
            raise ValueError(f"state: expected {{'epoch': int, 'index': int}}, got {state!r}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        return self

    def _order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_starts)

    def __next__(self) -> dict:
        starts = []
        while len(starts) < self.batch_size:
            order = self._order(self.epoch)
            take = min(self.batch_size - len(starts), self.num_starts - self.index)
            starts.extend(order[self.index:self.index + take])
            self.index += take
            if self.index == self.num_starts:
                self.epoch, self.index = self.epoch + 1, 0
        return self._batch(np.asarray(starts),
                           np.random.default_rng([self.seed, self.epoch, self.index, 1]))

    def _batch(self, starts, rng) -> dict:
        idx = starts[:, None] + np.arange(self.length + 1)[None, :]
        frames = self.series[idx]
        if self.min_length < self.length and rng is not None:
            lengths = rng.integers(self.min_length, self.length + 1, size=len(starts))
        else:
            lengths = np.full(len(starts), self.length)
        return {"inputs": Seq.from_lengths(frames[:, :-1], lengths.astype(np.int32)),
                "targets": jnp.asarray(frames[:, 1:])}

    def fixed_batches(self, count: int) -> list[dict]:
        """`count` batches of evenly spaced windows (deterministic, for evaluation)."""
        starts = np.linspace(0, self.num_starts - 1, count * self.batch_size).astype(int)
        return [self._batch(starts[i * self.batch_size:(i + 1) * self.batch_size], None)
                for i in range(count)]


# -------------------------------------------------------------------- model: predictor
def build_predictor(features: int, hidden: int = 16, kernel_size: int = 3, *, rngs: nnx.Rngs):
    """Causal next-frame predictor: `x + f(x)` with f = FeedForward in, causal Conv1D, LSTM,
    FeedForward out (the skip makes "no change" the starting guess; f learns the change)."""
    from streamzoo.layers.conv import Conv1D
    from streamzoo.layers.feedforward import FeedForward
    from streamzoo.layers.recurrent import LSTM

    return Residual(Serial(
        FeedForward(features, 2 * hidden, out_features=hidden, rngs=rngs),
        Conv1D(hidden, hidden, kernel_size, rngs=rngs),
        LSTM(hidden, hidden, rngs=rngs),
        FeedForward(hidden, 2 * hidden, out_features=features, rngs=rngs),
    ))


def masked_mse(y: Seq, targets) -> tuple[jax.Array, jax.Array]:
    """`(sum of squared errors over valid frames and features, number of valid values)`."""
    mask = y.mask[..., None].astype(jnp.float32)
    err = jnp.square(y.values.astype(jnp.float32) - targets.astype(jnp.float32)) * mask
    return err.sum(), mask.sum() * y.values.shape[-1]


def predictor_loss(model, batch, rng):
    """Mean squared next-frame error over valid frames (aux: `weight`, the value count)."""
    total, count = masked_mse(model(batch["inputs"]), batch["targets"])
    return total / jnp.maximum(count, 1.0), {"weight": count}


def make_predictor_tbptt_loss(chunk_size: int):
    """`predictor_loss` computed by truncated BPTT over chunks of `chunk_size` frames."""
    from streamzoo.train.tbptt import tbptt_loss

    def loss_fn(model, batch, rng):
        x = batch["inputs"]
        loss, _ = tbptt_loss(model, x, batch["targets"], masked_mse, chunk_size=chunk_size)
        return loss, {"weight": x.mask.sum().astype(jnp.float32) * x.values.shape[-1]}

    return loss_fn


@register_model("predictor")
def predictor_task(config: TrainConfig) -> TrainTask:
    defaults = {"series": "eeg", "hidden": 16, "kernel_size": 3, "min_length": None,
                "eval_fraction": 0.2}
    args = {**defaults, **config.model_args}
    unknown = sorted(set(args) - set(defaults))
    if unknown:
        raise ValueError(f"model_args: unknown keys {unknown} for model 'predictor'; "
                         f"expected some of {sorted(defaults)}")
    if args["series"] not in SERIES:
        raise ValueError(f"model_args.series: expected one of {sorted(SERIES)}, got {args['series']!r}")
    series = SERIES[args["series"]]()
    split = int(len(series) * (1 - args["eval_fraction"]))
    train = WindowBatches(series[:split], config.batch_size, config.seq_len, seed=config.seed,
                          min_length=args["min_length"])
    held_out = WindowBatches(series[split:], config.batch_size, config.seq_len, seed=config.seed)
    model = build_predictor(series.shape[1], args["hidden"], args["kernel_size"],
                            rngs=nnx.Rngs(config.seed))
    loss = (predictor_loss if not config.tbptt_chunk
            else make_predictor_tbptt_loss(config.tbptt_chunk))
    return TrainTask(model, loss, train, lambda: held_out.fixed_batches(config.eval_batches))


register_config("predictor", "default")
register_config("predictor", "tiny", num_steps=40, batch_size=4, seq_len=16, warmup_steps=4,
                eval_every=20, eval_batches=2, save_every=20, model_args={"hidden": 8})
register_config("predictor", "tiny-tbptt", num_steps=40, batch_size=4, seq_len=16, warmup_steps=4,
                eval_every=20, eval_batches=2, save_every=20, tbptt_chunk=4,
                model_args={"hidden": 8, "min_length": 10})
register_config("predictor", "small", num_steps=400, batch_size=16, seq_len=48, warmup_steps=40,
                eval_every=100, save_every=100, model_args={"series": "membrane", "hidden": 32})
register_config("predictor", "small-bf16", num_steps=400, batch_size=16, seq_len=48,
                warmup_steps=40, eval_every=100, save_every=100, compute_dtype="bfloat16",
                model_args={"series": "membrane", "hidden": 32})
register_config("predictor", "small-tbptt", num_steps=400, batch_size=16, seq_len=48,
                warmup_steps=40, eval_every=100, save_every=100, tbptt_chunk=8,
                model_args={"series": "membrane", "hidden": 32, "min_length": 24})


# ---------------------------------------------------------------------------------- run
def run(config: TrainConfig, out_dir: str, *, progress: bool = True, plot: bool = True,
        on_step: Callable[[int], None] | None = None):
    """Train `config` with checkpoints, metrics and plots in `out_dir` (resuming if possible).

    Writes `out_dir/config.json`, `metrics.jsonl`, `curves.png` (when `plot`) and
    `checkpoints/`. `on_step(step)` is called after every step. Returns the final TrainState.
    """
    from streamzoo.train.checkpoint import Checkpointer
    from streamzoo.train.loop import StepOptions, TrainState, fit, make_optimizer

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    task = build_task(config)
    tx, schedule = make_optimizer(config.learning_rate, config.num_steps,
                                  warmup_steps=min(config.warmup_steps, config.num_steps - 1),
                                  end_lr_ratio=config.end_lr_ratio,
                                  weight_decay=config.weight_decay, clip_norm=config.clip_norm)
    options = StepOptions(accum_steps=config.accum_steps, compute_dtype=config.compute_dtype,
                          lr_schedule=schedule)
    state = TrainState.create(task.model, tx, task.loss_fn, rng=config.seed, options=options,
                              carry=task.carry)
    with Checkpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=config.max_to_keep,
                      async_save=config.async_checkpointing) as ckpt:
        return fit(state, task.train_data, num_steps=config.num_steps, checkpointer=ckpt,
                   save_every=config.save_every, config=config.to_dict(),
                   eval_data=task.eval_data, eval_every=config.eval_every,
                   metrics_path=os.path.join(out_dir, "metrics.jsonl"),
                   plot_path=os.path.join(out_dir, "curves.png") if plot else None,
                   progress=progress,
                   log_every=config.log_every, on_step=on_step)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `streamzoo train` (for a sub-command parser)."""
    load_families()
    parser.add_argument("model", help=f"the model to train (registered: {', '.join(sorted(MODELS))})")
    parser.add_argument("--config", default=None,
                        help="a registered config name of the model, or a JSON file of TrainConfig "
                             "keys (optionally with \"base\": NAME)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable; dotted keys reach model_args)")
    parser.add_argument("--out", default=None,
                        help="run directory (default runs/MODEL-CONFIG); an existing one is resumed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list-configs", action="store_true",
                        help="print the model's registered configs and exit")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` sub-command to an argparse `subparsers`; sets `func=train_from_args`."""
    parser = subparsers.add_parser(
        "train", help="train a registered model (checkpoints, metrics, curves; resumes)",
        description="Train a registered streamzoo model with a named or JSON config. The run "
                    "directory gets config.json, metrics.jsonl, curves.png and orbax "
                    "checkpoints; rerunning the same command resumes from the last checkpoint.")
    add_train_arguments(parser)
    parser.set_defaults(func=train_from_args)
    return parser


def train_from_args(args: argparse.Namespace) -> int:
    load_families()
    if args.model not in MODELS:
        print(f"streamzoo train: error: model: expected one of {sorted(MODELS)}, got {args.model!r}",
              file=sys.stderr)
        return 2
    if args.list_configs:
        for name, data in sorted(CONFIGS.get(args.model, {}).items()):
            print(f"{name}: {json.dumps({k: v for k, v in data.items() if k not in ('model', 'name')})}")
        return 0
    try:
        config = load_config(args.model, args.config, args.overrides)
    except ValueError as e:
        print(f"streamzoo train: error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", f"{config.model}-{config.name}")
    from streamzoo.train.distributed import initialize
    initialize()  # joins a multi-process run (SLURM, TPU pod, env); a no-op on one process
    state = run(config, out, progress=not args.no_progress)
    print(f"trained {config.model} ({config.name}) to step {int(state.step)}; run directory {out}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """`streamzoo train <model> --config <name|file>` as a stand-alone entry point."""
    parser = argparse.ArgumentParser(prog="streamzoo train", description="Train a streamzoo model.")
    add_train_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return train_from_args(args)


if __name__ == "__main__":
    sys.exit(train_main())
