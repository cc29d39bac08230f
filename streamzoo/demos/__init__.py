"""Demos run by `streamzoo demo [family]`.

Each family is a module with `DESCRIPTION` (one line), `add_arguments(parser)` and
`run(args) -> int` (the exit code). Later issues register theirs here (asr, codec, vad, ...).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# family name -> module implementing it; the first one is what `streamzoo demo` runs.
FAMILIES: dict[str, str] = {
    "core": "streamzoo.demos.core_stack",
    "asr": "streamzoo.zoo.asr.demo",
    "codec": "streamzoo.zoo.codec.demo",
    "lm": "streamzoo.zoo.lm.demo",
    "vad": "streamzoo.zoo.vad.demo",
}
DEFAULT_FAMILY = "core"


def load(family: str) -> ModuleType:
    """The module of a demo family."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    return importlib.import_module(FAMILIES[family])
