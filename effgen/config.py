"""Configuration at the edge: default paths under one work directory, and the seed
notebook's environment variables honoured as defaults for CLI flags."""

import os
from pathlib import Path

from effgen.errors import ConfigError


def workdir() -> Path:
    """Root of every default output (never /tmp): $EFFGEN_WORKDIR or ./build."""
    return Path(os.environ.get("EFFGEN_WORKDIR", "build"))


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(float(raw))
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a number") from None


# Default locations of each stage's outputs, relative to workdir().
def default_paths() -> dict:
    w = workdir()
    return {
        "sample": w / "data" / "sample.root",
        "train": Path(env_str("TRAIN_DATA", str(w / "data" / "train"))),
        "test": Path(env_str("TEST_DATA", str(w / "data" / "test"))),
        "validation": Path(env_str("VALIDATION_DATA", str(w / "data" / "validation"))),
        "model": Path(env_str("OUTPUT_MODEL", str(w / "model" / "model.keras"))),
        "preprocessing": Path(env_str("OUTPUT_PREPROCESSING", str(w / "model" / "tX.pkl"))),
        "validation_report": w / "validation",
        "lamarr": w / "lamarr",
        "parity": w / "parity",
        "bench": w / "bench",
    }


def shipped_dir(name: str, marker: str) -> Path:
    """`templates/` or `c_harness/`: at the repository root in a checkout, inside the
    package (effgen/<name>) in an installed wheel. `marker` is a file it must hold."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / name, here / name):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(f"effgen's {name}/ not found beside {here} (looked for {name}/{marker})")
