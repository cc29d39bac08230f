"""The checked-in trained codec: weights as one `.npz` of float32 arrays plus a JSON file.

`weights/codec_small.npz` holds every parameter under its nnx path (`encoder_net/layers/0/
kernel`, ...); `weights/codec_small.json` holds the `CodecConfig`, the training config and
facts about the run (steps, corpus, measured quality). `load_pretrained()` rebuilds the codec
from the JSON without initialising it (`nnx.eval_shape`) and fills in the arrays, checking
that the set of names and every shape match: no orbax, no training code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import numpy as np
from flax import nnx

from streamzoo.zoo.codec.model import Codec, CodecConfig
from streamzoo.zoo.weights import load_state_arrays, state_arrays

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_NAME = "codec_small"


def _config_dict(config: CodecConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items()}


def save_pretrained(codec: Codec, out_dir: str, *, name: str = DEFAULT_NAME,
                    metadata: Mapping | None = None) -> str:
    """Write `<out_dir>/<name>.npz` (parameters) and `<name>.json` (config + metadata)."""
    if not isinstance(codec, Codec):
        raise ValueError(f"codec: expected a Codec, got {type(codec).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.npz")
    np.savez_compressed(path, **state_arrays(codec, nnx.Param))
    blob = {"format": "streamzoo-codec-npz/1", "codec_config": _config_dict(codec.config),
            **(dict(metadata) if metadata else {})}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(blob, f, indent=1)
    return path


def read_metadata(path: str | None = None) -> dict:
    """The JSON next to the weights (default: the checked-in ones)."""
    npz = _resolve(path)
    with open(npz[:-4] + ".json") as f:
        return json.load(f)


def _resolve(path: str | None) -> str:
    path = path or os.path.join(WEIGHTS_DIR, f"{DEFAULT_NAME}.npz")
    if not path.endswith(".npz"):
        raise ValueError(f"path: expected a .npz weights file, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    if not os.path.isfile(path[:-4] + ".json"):
        raise FileNotFoundError(f"path: expected its config {path[:-4] + '.json'!r} next to it")
    return path


def load_pretrained(path: str | None = None, *, num_quantizers: int | None = None) -> Codec:
    """The trained codec (default: the checked-in `weights/codec_small.npz`), streaming with
    `num_quantizers` codebooks (default all; fewer = a lower bitrate, same weights)."""
    npz = _resolve(path)
    meta = read_metadata(npz)
    if meta.get("format") != "streamzoo-codec-npz/1":
        raise ValueError(f"path: expected format 'streamzoo-codec-npz/1' in the JSON, got "
                         f"{meta.get('format')!r}")
    config = CodecConfig(**meta["codec_config"])
    codec = nnx.eval_shape(lambda: Codec(config, rngs=nnx.Rngs(0)))  # no random init
    with np.load(npz) as data:
        load_state_arrays(codec, dict(data), nnx.Param,
                          what=f"path: {npz} (for the config in its JSON)")
    return codec if num_quantizers is None else codec.with_num_quantizers(num_quantizers)
