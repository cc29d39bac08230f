"""What every demo family shares on the command line: argument types and running a family's
module on its own (`python -m streamzoo.zoo.asr.demo ...`, or from tests) exactly as
`streamzoo demo FAMILY ...` does."""

from __future__ import annotations

import argparse
from types import ModuleType


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def standalone(module: ModuleType, family: str, argv: list[str] | None = None) -> int:
    """Parse `argv` with the family module's `add_arguments` and return its `run`'s exit code."""
    parser = argparse.ArgumentParser(prog=f"streamzoo demo {family}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))
