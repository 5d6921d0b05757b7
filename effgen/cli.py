"""The `effgen` command: one subcommand per pipeline stage.

Each stage module exposes `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed arguments; heavy imports (TensorFlow) happen
inside those callables so `effgen --help` stays fast.

One error policy for every stage: an EffgenError (or a missing/unreadable file) is
printed as `effgen <stage>: <message>` and the process exits 1, without a traceback."""

import argparse
import importlib
import sys

from effgen.config import resolve_lazy
from effgen.errors import EffgenError

# In pipeline order: stage name -> the module that registers it. A module that cannot be
# imported is an error (a broken install), never silently skipped.
STAGES = {
    "synth": "effgen.data.synth",
    "preprocess": "effgen.data.preprocess",
    "train": "effgen.training.train",
    "baseline": "effgen.training.baseline",
    "validate": "effgen.training.validate",
    "export": "effgen.codegen.export",
    "describe": "effgen.checks.describe",
    "parity": "effgen.checks.parity",
    "lamarr": "effgen.checks.lamarr",
    "bench": "effgen.bench.latency",
}


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a bad flag; effgen's policy is one line and exit 1."""

    def error(self, message):
        self.exit(1, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="effgen",
        description="Train the Lamarr tracking-efficiency model and deploy it as C.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for module_name in STAGES.values():
        importlib.import_module(module_name).register(sub)
    return parser


def _aliases(argv):
    """`effgen export --describe LIB` (the older spelling) is `effgen describe LIB`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"] and "--describe" in argv:
        i = argv.index("--describe")
        argv = ["describe"] + argv[i + 1:i + 2] + argv[1:i] + argv[i + 2:]
    return argv


def main(argv=None) -> int:
    argv = _aliases(argv)
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
    except EffgenError as err:  # e.g. a bad environment variable read for a default
        print(f"effgen: {err}", file=sys.stderr)
        return 1
    except SystemExit as done:  # --help (0) or a bad flag (1, its line already printed)
        return done.code if isinstance(done.code, int) else 1
    stage = f"effgen {args.command}"
    if unknown:
        print(f"{stage}: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 1
    try:
        resolve_lazy(args)  # environment defaults are read (and checked) only now
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr)
        return 130
    except (EffgenError, OSError) as err:
        print(f"{stage}: {_one_line(err)}", file=sys.stderr)
        return 1
    return int(rc or 0)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, EffgenError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
