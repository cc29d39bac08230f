"""Training `StreamingLM` on real text, and the small checked-in model trained that way.

Registers model `"lm"` with `streamzoo.train` (so `streamzoo train lm --config small` works):
a byte-level (`ByteTokenizer`, 258 ids) decoder-only transformer trained by next-token
cross-entropy on fixed windows of `seq_len + 1` tokens (the training context C = `seq_len`)
cut from the Python documentation (`streamzoo.train.data.text`, split by document: held-out
documents are never trained on and give the eval batches). Training uses full causal
attention over the window (`FullCache(C)`); evaluate or serve the same parameters under any
KV policy with `with_policy` (see `streamzoo.zoo.lm.perplexity`).

`model_args.min_length` < C gives every training row a random valid length (drawn from the
step's key), so the loss and the model also see ragged, masked rows.

`model_args.start_token=True` is StreamingLLM's "pre-training with a sink token" (section 3.3
of the paper): the vocabulary gets one more id, `START = 258`, which never occurs in text, and
every training window is `[START, t_0 .. t_{C-2}]` predicting `t_0 .. t_{C-1}`, so the model
always sees the same token at position 0. A stream is then started with `START`.

The checked-in weights (`weights/<name>.npz` + `weights/<name>.json`: float32 parameters by
path, the architecture, the context, the start token, the corpus split and how the run went)
are `lm-small` (config "small") and `lm-small-sink` (config "small-sink", start token):

    python -m streamzoo.zoo.lm.training --config small --out runs/lm-small \\
        --export streamzoo/zoo/lm/weights
    python -m streamzoo.zoo.lm.training --config small-sink --out runs/lm-small-sink \\
        --export streamzoo/zoo/lm/weights --name lm-small-sink

They load without orbax: `load_pretrained(policy=..., name=...)`; benchmarks/RESULTS.md §lm
has their perplexity table.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time

if __name__ == "__main__":  # run the registered module's `main`, not a second copy of it
    from streamzoo.zoo.lm.training import main as _main

    sys.exit(_main())

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamzoo.core.seq import Seq
from streamzoo.layers.kv_policies import FullCache, KVPolicy
from streamzoo.train.configs import TrainConfig, TrainTask, register_config, register_model
from streamzoo.train.data.text import TokenWindows, load_text_corpus
from streamzoo.train.data.tokenizers import ByteTokenizer
from streamzoo.zoo.lm.model import StreamingLM
from streamzoo.zoo.lm.perplexity import token_nll
from streamzoo.zoo.weights import load_state_arrays, state_arrays

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
PRETRAINED = "lm-small"
START = ByteTokenizer.vocab_size  # the extra id of `start_token=True` models (258)
WEIGHTS_FORMAT = "streamzoo-lm-weights-v1"

ARCH_KEYS = ("vocab_size", "features", "num_layers", "num_heads", "num_kv_heads", "hidden",
             "tie_embeddings", "rope_base")
DEFAULT_ARGS = {"source": "auto", "heldout_fraction": 0.05, "split_seed": 0, "features": 128,
                "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "hidden": 384,
                "tie_embeddings": True, "rope_base": 10000.0, "min_length": None,
                "start_token": False}


# ----------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)
def text_corpus(source: str = "auto", heldout_fraction: float = 0.05, split_seed: int = 0):
    """`load_text_corpus` memoised (the python-docs corpus takes ~1 s to read and tokenize)."""
    return load_text_corpus(source, heldout_fraction=heldout_fraction, seed=split_seed)


def next_token_batch(windows, start_token: int | None = None) -> dict:
    """Windows `[B, C + 1]` of token ids -> `{"inputs": Seq [B, C], "targets": [B, C]}`; with
    `start_token`, windows `[B, C]` -> inputs `[START, w_0 .. w_{C-2}]`, targets `w`."""
    ids = np.stack([np.asarray(w, np.int32) for w in windows])
    if start_token is not None:
        ids = np.concatenate([np.full((len(ids), 1), start_token, np.int32), ids], axis=1)
    return {"inputs": Seq.full(jnp.asarray(ids[:, :-1])), "targets": jnp.asarray(ids[:, 1:])}


def _windows(tokens, context: int, start_token: int | None) -> TokenWindows:
    """Training/eval windows: C + 1 tokens (C without a start token), stride C."""
    return TokenWindows(tokens, context + (start_token is None), stride=context)


def heldout_batches(tokens, context: int, batch_size: int, count: int,
                    start_token: int | None = None) -> list[dict]:
    """`count` batches of evenly spaced held-out windows (deterministic, for evaluation)."""
    windows = _windows(tokens, context, start_token)
    if len(windows) < batch_size:
        raise ValueError(f"batch_size: expected <= the {len(windows)} held-out windows of "
                         f"{context + 1} tokens, got {batch_size}")
    starts = np.linspace(0, len(windows) - 1, count * batch_size).astype(int)
    return [next_token_batch([windows[i] for i in starts[j * batch_size:(j + 1) * batch_size]],
                             start_token) for j in range(count)]


# ----------------------------------------------------------------------------------- loss
def make_lm_loss(min_length: int | None = None):
    """Mean next-token cross-entropy over the valid frames of `batch["inputs"]` (aux: `weight`,
    the valid-token count, and `bits_per_byte`). With `min_length` and a training key, each row
    keeps a random prefix of `min_length .. C` tokens (masked windows)."""

    def loss_fn(model, batch, rng):
        x, targets = batch["inputs"], batch["targets"]
        if min_length is not None and rng is not None:
            lengths = jax.random.randint(rng, (x.batch_size,), min_length, x.length + 1)
            x = x.replace(mask=x.mask & (jnp.arange(x.length)[None] < lengths[:, None]))
        y = model(x)
        w = y.mask.astype(jnp.float32)
        count = w.sum()
        loss = (token_nll(y.values, targets) * w).sum() / jnp.maximum(count, 1.0)
        return loss, {"weight": count, "bits_per_byte": loss / jnp.log(2.0)}

    return loss_fn


# ---------------------------------------------------------------------------------- model
def model_args(config: TrainConfig) -> dict:
    args = {**DEFAULT_ARGS, **config.model_args}
    unknown = sorted(set(args) - set(DEFAULT_ARGS))
    if unknown:
        raise ValueError(f"model_args: unknown keys {unknown} for model 'lm'; expected some of "
                         f"{sorted(DEFAULT_ARGS)}")
    m = args["min_length"]
    if m is not None and not (isinstance(m, int) and 1 <= m <= config.seq_len):
        raise ValueError(f"model_args.min_length: expected None or an int in [1, seq_len="
                         f"{config.seq_len}], got {m!r}")
    return args


def build_lm(arch: dict, policy: KVPolicy, *, seed: int = 0, dtype=None) -> StreamingLM:
    """A `StreamingLM` from an architecture dict (`ARCH_KEYS`)."""
    return StreamingLM(arch["vocab_size"], arch["features"], arch["num_layers"],
                       arch["num_heads"], arch["num_kv_heads"], arch["hidden"], policy=policy,
                       tie_embeddings=arch["tie_embeddings"], rope_base=arch["rope_base"],
                       dtype=dtype, rngs=nnx.Rngs(seed))


def architecture(config: TrainConfig) -> dict:
    args = model_args(config)
    return {"vocab_size": ByteTokenizer.vocab_size + bool(args["start_token"]),
            **{k: args[k] for k in ARCH_KEYS if k != "vocab_size"}}


def start_token_of(config: TrainConfig) -> int | None:
    """`START` for `model_args.start_token=True` configs, else None."""
    return START if model_args(config)["start_token"] else None


@register_model("lm")
def lm_task(config: TrainConfig) -> TrainTask:
    """Byte-level next-token training of `StreamingLM` on the text corpus (module docstring)."""
    from streamzoo.train.data.pipeline import make_batches

    args = model_args(config)
    corpus = text_corpus(args["source"], args["heldout_fraction"], args["split_seed"])
    context = config.seq_len
    model = build_lm(architecture(config), FullCache(context), seed=config.seed)
    start = start_token_of(config)
    windows = _windows(corpus.train_tokens, context, start)
    train = iter(make_batches(windows, batch_size=config.batch_size, seed=config.seed,
                              batch_fn=functools.partial(next_token_batch, start_token=start)))
    eval_data = functools.partial(heldout_batches, corpus.heldout_tokens, context,
                                  config.batch_size, config.eval_batches, start)
    return TrainTask(model, make_lm_loss(args["min_length"]), train, eval_data)


register_config("lm", "default", seq_len=128, batch_size=32, num_steps=2000,
                learning_rate=3e-3, warmup_steps=100, weight_decay=0.01, eval_every=250,
                save_every=250, log_every=10)
# Seconds on a CPU: the unit test trains it (pydoc-topics is always present; ragged rows).
register_config("lm", "tiny", seq_len=32, batch_size=4, num_steps=30, learning_rate=1e-2,
                warmup_steps=3, eval_every=30, eval_batches=2, save_every=30,
                async_checkpointing=False,
                model_args={"source": "pydoc-topics", "heldout_fraction": 0.1, "features": 32,
                            "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "hidden": 64,
                            "min_length": 16})
# The checked-in model: D=128, 4 layers, 4 query / 2 KV heads, context 128, ~0.8 M parameters,
# sized for <= 15 minutes on a shared 2-core CPU (~1.1 s per step of 4096 tokens).
register_config("lm", "small", seq_len=128, batch_size=32, num_steps=700,
                learning_rate=3e-3, warmup_steps=50, weight_decay=0.01, eval_every=175,
                eval_batches=8, save_every=175, log_every=10,
                model_args={"source": "python-docs"})
# The same with StreamingLLM's dedicated start (sink) token at position 0 of every window.
register_config("lm", "small-sink", seq_len=128, batch_size=32, num_steps=700,
                learning_rate=3e-3, warmup_steps=50, weight_decay=0.01, eval_every=175,
                eval_batches=8, save_every=175, log_every=10,
                model_args={"source": "python-docs", "start_token": True})


# -------------------------------------------------------------------------------- weights
def save_weights(model: StreamingLM, directory: str, name: str, *, context: int,
                 info: dict | None = None) -> tuple[str, str]:
    """Write `name.npz` (float32 parameters by path) and `name.json` (architecture, context,
    `info`, the npz's sha256) into `directory`; returns both paths."""
    os.makedirs(directory, exist_ok=True)
    npz_path = os.path.join(directory, name + ".npz")
    json_path = os.path.join(directory, name + ".json")
    params = {k: np.asarray(v, np.float32) for k, v in state_arrays(model, nnx.Param).items()}
    np.savez_compressed(npz_path, **params)
    with open(npz_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    meta = {"format": WEIGHTS_FORMAT,
            "architecture": {k: getattr(model, a) for k, a in (
                ("vocab_size", "vocab_size"), ("features", "features"),
                ("num_layers", "num_layers"), ("num_heads", "num_heads"),
                ("num_kv_heads", "num_kv_heads"), ("hidden", "hidden_size"),
                ("tie_embeddings", "tie_embeddings"), ("rope_base", "rope_base"))},
            "context": int(context), "tokenizer": "ByteTokenizer",
            "num_parameters": int(sum(a.size for a in params.values())),
            "npz_sha256": digest, **(info or {})}
    with open(json_path, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return npz_path, json_path


def pretrained_info(name: str = PRETRAINED, directory: str = WEIGHTS_DIR) -> dict:
    """The JSON metadata of checked-in weights (architecture, context, corpus split, run)."""
    path = os.path.join(directory, name + ".json")
    if not os.path.isfile(path):
        raise ValueError(f"name: expected weights {name!r} in {directory} ({name}.json), "
                         f"found none")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: expected format {WEIGHTS_FORMAT!r}, got {meta.get('format')!r}")
    return meta


def load_pretrained(policy: KVPolicy | None = None, *, name: str = PRETRAINED,
                    directory: str = WEIGHTS_DIR, dtype=None,
                    max_rollback: int = 0) -> StreamingLM:
    """The checked-in byte-level LM under `policy` (default `FullCache(context)`, the
    training setting; e.g. `SinksWindow(4, 60)` for StreamingLLM). See `pretrained_info`."""
    meta = pretrained_info(name, directory)
    arch = meta["architecture"]
    policy = FullCache(meta["context"]) if policy is None else policy
    if not isinstance(policy, KVPolicy):
        raise ValueError(f"policy: expected a KVPolicy, got {type(policy).__name__}")
    model = nnx.eval_shape(lambda: StreamingLM(
        arch["vocab_size"], arch["features"], arch["num_layers"], arch["num_heads"],
        arch["num_kv_heads"], arch["hidden"], policy=policy,
        tie_embeddings=arch["tie_embeddings"], rope_base=arch["rope_base"],
        max_rollback=max_rollback, dtype=dtype, rngs=nnx.Rngs(0)))
    with np.load(os.path.join(directory, name + ".npz")) as data:
        load_state_arrays(model, dict(data), nnx.Param,
                          what=f"{name}.npz (for the architecture in {name}.json)")
    return model


# ------------------------------------------------------------------------------------ run
def main(argv: list[str] | None = None) -> int:
    """Train a registered "lm" config (resuming `--out`) and optionally export its weights."""
    from streamzoo.train.configs import load_config, run
    from streamzoo.train.metrics import read_metrics

    parser = argparse.ArgumentParser(prog="python -m streamzoo.zoo.lm.training",
                                     description=main.__doc__)
    parser.add_argument("--config", default="small", help="registered config of 'lm' or JSON")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--out", default=None, help="run directory (default runs/lm-CONFIG)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="write NAME.npz + NAME.json of the final parameters into DIR")
    parser.add_argument("--name", default=PRETRAINED, help="file name of the exported weights")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = load_config("lm", args.config, args.overrides)
    out = args.out or os.path.join("runs", f"lm-{config.name}")
    t0 = time.time()
    state = run(config, out, progress=not args.no_progress, plot=False)
    wall = time.time() - t0
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    train = [r for r in records if r.get("split", "train") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    print(f"trained lm ({config.name}) to step {int(state.step)} in {wall:.0f} s; "
          f"last train loss {train[-1]['loss']:.4f}, held-out loss "
          f"{evals[-1]['loss'] if evals else float('nan'):.4f} nats/byte", flush=True)
    if args.export:
        margs = model_args(config)
        corpus = text_corpus(margs["source"], margs["heldout_fraction"], margs["split_seed"])
        info = {"start_token": start_token_of(config),
                "corpus": {"source": margs["source"], "heldout_fraction": margs["heldout_fraction"],
                           "split_seed": margs["split_seed"],
                           "train_tokens": int(len(corpus.train_tokens)),
                           "heldout_tokens": int(len(corpus.heldout_tokens)),
                           "heldout_documents": list(corpus.heldout_names)},
                "train": {"config": config.to_dict(), "steps": int(state.step),
                          "tokens_seen": int(state.step) * config.batch_size * config.seq_len,
                          "wall_seconds_this_invocation": round(wall, 1),
                          "train_loss_last": train[-1]["loss"],
                          "heldout_loss": evals[-1]["loss"] if evals else None,
                          "eval_curve": [(r["step"], r["loss"]) for r in evals]}}
        paths = save_weights(state.model(), args.export, args.name, context=config.seq_len,
                             info=info)
        for p in paths:
            print(f"wrote {p} ({os.path.getsize(p)} bytes)")
    return 0


__all__ = ["WEIGHTS_DIR", "build_lm", "heldout_batches", "load_pretrained", "lm_task",
           "make_lm_loss", "next_token_batch", "pretrained_info", "save_weights", "text_corpus"]

