"""The `streamzoo` command line.

    streamzoo demo                 # the core demo, after listing the demo families
    streamzoo demo core --quick    # one family, with its own options (see --help)

Demo families live in `streamzoo.demos.FAMILIES`; later issues add theirs there.
"""

from __future__ import annotations

import argparse
import sys

from streamzoo import __version__
from streamzoo import demos


def _family_list() -> str:
    lines = []
    for name in demos.FAMILIES:
        default = " (default)" if name == demos.DEFAULT_FAMILY else ""
        lines.append(f"  {name}{default}: {demos.load(name).DESCRIPTION}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamzoo",
        description="streamzoo: JAX/Flax streaming models whose chunk-by-chunk output equals "
                    "their offline output.")
    parser.add_argument("--version", action="version", version=f"streamzoo {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="stream real input through a model and compare with offline",
        description="Stream real input through a model chunk by chunk, check that the "
                    "output equals the offline output, and print per-chunk latency, carry "
                    "size and the largest deviation. Without a family, runs "
                    f"'{demos.DEFAULT_FAMILY}' (its options may follow directly).",
        epilog="'streamzoo demo FAMILY --help' lists a family's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    families = demo.add_subparsers(dest="family", metavar="FAMILY")
    for name in demos.FAMILIES:
        module = demos.load(name)
        sub = families.add_parser(name, help=module.DESCRIPTION, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)

    from streamzoo.train.configs import add_train_parser  # `streamzoo train MODEL --config NAME`
    add_train_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `streamzoo` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        rest = argv[1:]
        if not rest or (rest[0] not in demos.FAMILIES and rest[0] not in ("-h", "--help")):
            print(f"Demo families (streamzoo demo FAMILY):\n{_family_list()}\n"
                  f"Running '{demos.DEFAULT_FAMILY}'.\n", flush=True)
            argv = ["demo", demos.DEFAULT_FAMILY, *rest]
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return demos.load(args.family).run(args)
    if args.command == "train":
        return args.func(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
