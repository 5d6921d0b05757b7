"""The `effgen` command: one subcommand per pipeline stage.

Each stage module exposes `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed arguments; heavy imports (TensorFlow) happen
inside those callables so `effgen --help` stays fast."""

import argparse
import importlib
import sys

# In pipeline order; a module that does not exist yet is simply not offered.
STAGES = ["synth", "preprocess", "train", "validate", "export", "parity", "lamarr", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effgen",
        description="Train the Lamarr tracking-efficiency model and deploy it as C.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        try:
            module = importlib.import_module(f"effgen.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"effgen.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("effgen: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
