"""One table of defaults: every knob a stage, the CLI or the Makefile exposes, with its
environment variable (the seed notebook's names where it had one), type and doc.

Precedence, everywhere: a command-line flag (or `make VAR=...`) beats the environment,
which beats the table. Environment values are read and checked only when the stage that
uses them runs (`BATCH_SIZE=abc effgen synth --help` works; `effgen train` then says
which variable is wrong). The Makefile takes its defaults from `defaults.mk`, generated
from this table (`python -m effgen.config --make > defaults.mk`; a test keeps it current).

Run `python -m effgen.config` for the table as Markdown."""

import argparse
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from effgen.errors import ConfigError


@dataclass(frozen=True)
class Knob:
    env: str        # environment variable, also the Make variable unless `make` says otherwise
    default: object  # for paths, a template on {workdir}
    type: str       # int, float, str, path, flags
    doc: str
    minimum: float = None  # smallest accepted value (int, float)
    make: str = None       # the Make variable's name when it differs from `env`
    env_read: bool = True  # False: fixed in the table (compiler flags the guarantees rest on)


_KNOBS = (
    # Where everything goes.
    Knob("EFFGEN_WORKDIR", "build", "path", "root of every default output (make: W)", make="W"),
    Knob("TRAIN_DATA", "{workdir}/data/train", "path", "training shard directory"),
    Knob("VALIDATION_DATA", "{workdir}/data/validation", "path", "validation shard directory"),
    Knob("TEST_DATA", "{workdir}/data/test", "path", "test shard directory"),
    Knob("OUTPUT_MODEL", "{workdir}/model/model.keras", "path", "trained model (.keras)"),
    Knob("OUTPUT_PREPROCESSING", "{workdir}/model/tX.pkl", "path",
         "fitted preprocessing (pickled ColumnTransformer)"),
    # synth / preprocess / train.
    Knob("N_PARTICLES", 4_000_000, "int",
         "rows of the synthetic sample (4M: 2M training rows for the default recipe)", minimum=1),
    Knob("SEED", 42, "int", "seed of synth, preprocess (split, quantiles) and train", minimum=0),
    Knob("RECIPE", "default", "str",
         "training recipe (effgen/training/recipes.py): default, or seed (the notebook's)"),
    Knob("TRAIN_BACKEND", None, "str",
         "Keras backend of effgen train: jax or tensorflow (empty: the recipe's, jax for default, "
         "tensorflow for seed)"),
    # Empty: the recipe's own value (effgen/training/recipes.py holds the recipes' table).
    Knob("BATCH_SIZE", None, "int", "rows per training batch (the seed notebook used 100000)", minimum=1),
    Knob("STEPS_PER_EPOCH", None, "int", "training batches per epoch", minimum=1),
    Knob("MAX_EPOCHS", None, "int", "epochs per training phase at most", minimum=1),
    Knob("PRE_TRAINING_TIME_LIMIT_SECONDS", None, "float", "first phase's time limit", minimum=0),
    Knob("FINE_TUNING_TIME_LIMIT_SECONDS", None, "float",
         "last phase's time limit (a one-phase recipe's only limit)", minimum=0),
    # Distillation (Makefile, effgen/training/distill.py; issue 14): two teachers of 20,000
    # steps, then a student of 10,000 steps on their mean (4M-particle sample, test split):
    # teachers long 0.00732 / 0.00716, student 0.00646 (baseline 0.00733), every class
    # ~10 % better than a teacher. In the main job the teachers run side by side with the
    # baseline and the acceptance beside them (~46k samples/s each): 20 epochs did not fit
    # 270 s there (13 did; student long 0.00672; 9:12 wall), so at most 15 epochs within
    # 220 s (10-11 fit on this 2-core machine: student long 0.00677, 0.00686; ~8 min wall);
    # the student runs on both cores (~90 s).
    Knob("TEACHERS", 2, "int",
         "networks (seeds SEED+1, ...) whose mean probabilities the efficiency model learns "
         "in make's main job, 0 to 9; 0: it learns the labels (RECIPE=seed: always)", minimum=0),
    Knob("TEACHER_MAX_EPOCHS", 15, "int", "epochs of each teacher (MAX_EPOCHS overrides)", minimum=1),
    Knob("TEACHER_TIME_LIMIT_SECONDS", 220, "float",
         "each teacher's time limit (FINE_TUNING_TIME_LIMIT_SECONDS overrides)", minimum=0),
    Knob("STUDENT_MAX_EPOCHS", 10, "int",
         "epochs of the efficiency model learning from teachers (MAX_EPOCHS overrides)", minimum=1),
    Knob("STUDENT_TIME_LIMIT_SECONDS", 150, "float",
         "its time limit (FINE_TUNING_TIME_LIMIT_SECONDS overrides)", minimum=0),
    # 45 s of training + ~15 s of start-up, data loading and its check: about a minute,
    # run beside the teachers' training (MAIN_JOBS) in the main job's 10 (issue 14).
    Knob("ACCEPTANCE_TIME_LIMIT_SECONDS", 45, "float",
         "acceptance model's training time limit in make's main job (its recipe's last phase)",
         minimum=0),
    # export and the library build.
    # The two teachers and, beside them, the baseline fit then the acceptance training
    # (one core's worth between them), instead of ~2 minutes of the main job's 10 after.
    Knob("MAIN_JOBS", 3, "int", "stages of make's main job run side by side (make -j) at most",
         minimum=1),
    Knob("RESOLUTION", "", "str",
         "trained resolution generator for tracking.so: a directory with model.keras, tX.pkl, "
         "tY.pkl (empty: none)"),
    Knob("COVARIANCE", "", "str",
         "trained covariance generator for tracking.so, same layout (empty: none)"),
    Knob("BACKEND", "effgen", "str", "code generator: effgen, or scikinc (the reference route)"),
    Knob("SYMBOL", "efficiency", "str", "exported function name of the library"),
    Knob("CC", "gcc", "str", "C compiler of the library"),
    Knob("ARCH_FLAGS", "", "flags",
         "extra compiler flags, e.g. -march=native (empty: portable, dispatch inside the .so)"),
    Knob("LIB_CFLAGS", "-std=c99 -O3 -fPIC -Wall -Wextra -Werror", "flags",
         "compiler flags of the library (make, parity's production build, bench)",
         env_read=False),
    Knob("LIB_LDFLAGS", "-shared -Wl,-z,relro,-z,now", "flags",
         "link flags of the library (full RELRO)", env_read=False),
)
KNOBS = {k.env: k for k in _KNOBS}


def parse(knob: Knob, raw: str, where: str = None):
    """`raw` (from `where`: an environment variable, or None for a flag argparse names)
    as the knob's type, checked."""
    what = f"{where}={raw!r}" if where else repr(raw)
    if knob.type in ("str", "flags"):
        return raw
    if knob.type == "path":
        if raw == "":
            raise ConfigError(f"{what} is empty: expected a path")
        return Path(raw)
    try:
        value = float(raw)
    except ValueError:
        kind = "an integer" if knob.type == "int" else "a number"
        raise ConfigError(f"{what} is not {kind}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{what} is not a finite number")
    if knob.type == "int":
        if value != int(value):  # 1.9 particles is a typo, never silently 1
            raise ConfigError(f"{what} is not an integer")
        value = int(value)
    if knob.minimum is not None and value < knob.minimum:
        raise ConfigError(f"{what} must be >= {knob.minimum:g}")
    return value


def table_default(name: str):
    """The table's own default (paths under the table's workdir template)."""
    knob = KNOBS[name]
    if knob.type == "path":
        return Path(str(knob.default).format(workdir=workdir()))
    return knob.default


def value(name: str):
    """The knob's value outside the CLI: the environment if set (and non-empty), else the
    table. A bad environment value raises ConfigError naming the variable."""
    knob = KNOBS[name]
    raw = os.environ.get(knob.env) if knob.env_read else None
    if raw is None or raw == "":
        return table_default(name)
    return parse(knob, raw, f"environment variable {knob.env}")


class Lazy:
    """A CLI default that reads its environment variable only when the stage runs.
    `cli.main` replaces it by `value(name)`; str() (for --help) never fails."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self):
        knob = KNOBS[self.name]
        raw = os.environ.get(knob.env) if knob.env_read else None
        if raw:
            return f"${knob.env}={raw}"
        default = table_default(self.name)
        return "the recipe's" if default is None else str(default)

    def resolve(self):
        return value(self.name)


def resolve_lazy(namespace) -> None:
    """Replace every Lazy default left in parsed arguments by its value."""
    for key, val in vars(namespace).items():
        if isinstance(val, Lazy):
            setattr(namespace, key, val.resolve())


def add_knob(parser, flag: str, name: str, help: str = None, **kwargs):
    """A flag whose default comes from the table through the environment (CLI > env >
    table). The flag's own value is checked like the environment's."""
    knob = KNOBS[name]

    def convert(raw):
        try:
            return parse(knob, raw)
        except ConfigError as err:  # argparse then says "argument --flag: <why>"
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = knob.type  # argparse names the type in its own messages
    env = f"env {knob.env}; " if knob.env_read else ""
    return parser.add_argument(flag, type=convert, default=Lazy(name),
                               help=f"{help or knob.doc} ({env}default %(default)s)", **kwargs)


def positive_int(flag: str):
    """An argparse type for a flag that is not a table knob but must be >= 1."""
    def convert(raw):
        try:
            return parse(Knob(flag, None, "int", "", minimum=1), raw)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = "int"
    return convert


def workdir() -> Path:
    """Root of every default output (never /tmp): $EFFGEN_WORKDIR or ./build."""
    return Path(os.environ.get("EFFGEN_WORKDIR") or KNOBS["EFFGEN_WORKDIR"].default)


def env_int(name: str, default: int) -> int:
    """An environment integer outside the table (checked like a knob). Knobs belong in
    the table: prefer add_knob / value()."""
    raw = os.environ.get(name)
    return default if not raw else parse(Knob(name, default, "int", ""), raw,
                                         f"environment variable {name}")


# Default locations of each stage's outputs. Paths never fail to parse, so they are read
# when the parsers are built (tests and --help show them).
def default_paths() -> dict:
    w = workdir()
    return {
        "sample": w / "data" / "sample.root",
        "train": value("TRAIN_DATA"),
        "test": value("TEST_DATA"),
        "validation": value("VALIDATION_DATA"),
        "model": value("OUTPUT_MODEL"),
        "acceptance_model": w / "acceptance" / "model.keras",
        "preprocessing": value("OUTPUT_PREPROCESSING"),
        "validation_report": w / "validation",
        "baseline": w / "baseline" / "predictions.npz",
        "lamarr": w / "lamarr",
        "parity": w / "parity",
        "bench": w / "bench",
    }


def library_compile_flags() -> list:
    return shlex.split(KNOBS["LIB_CFLAGS"].default)


def library_link_flags() -> list:
    return shlex.split(KNOBS["LIB_LDFLAGS"].default)


def library_cflags() -> list:
    """Compiler then link flags of the library, as make, parity and bench use them."""
    return library_compile_flags() + library_link_flags()


def shipped_dir(name: str, marker: str) -> Path:
    """`templates/` or `c_harness/`: at the repository root in a checkout, inside the
    package (effgen/<name>) in an installed wheel. `marker` is a file it must hold."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / name, here / name):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(f"effgen's {name}/ not found beside {here} (looked for {name}/{marker})")


# ---- the table for make and for people ---------------------------------------------------

def make_include() -> str:
    lines = ["# Generated from effgen/config.py by `python -m effgen.config --make`: do not edit.",
             "# Precedence: make VAR=... > the environment > these defaults (?=)."]
    for k in _KNOBS:
        default = "" if k.default is None else str(k.default).replace("{workdir}", "$(W)")
        if isinstance(k.default, float) and k.default == int(k.default):
            default = str(int(k.default))
        op = "?=" if k.env_read else ":="
        lines.append(f"# {k.doc}")
        if k.env == "EFFGEN_WORKDIR":  # W, else the environment's EFFGEN_WORKDIR
            default = f"$(if $(EFFGEN_WORKDIR),$(EFFGEN_WORKDIR),{default})"
        if k.env == "CC":  # make's built-in CC (cc) is no choice of the user's
            lines.append(f"ifeq ($(origin CC),default)\nCC := {default}\nendif")
            continue
        lines.append(f"{k.make or k.env} {op} {default}".rstrip())
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    rows = ["| knob (env / make) | default | type | what |", "|---|---|---|---|"]
    for k in _KNOBS:
        name = k.env + (f" (make {k.make})" if k.make else "") + ("" if k.env_read else " (fixed)")
        default = "(the recipe's)" if k.default is None else f"`{k.default}`"
        rows.append(f"| `{name}` | {default} | {k.type} | {k.doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(make_include() if sys.argv[1:] == ["--make"] else markdown_table())
