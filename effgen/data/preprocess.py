"""`effgen preprocess`: fit the production preprocessing and split the sample.

The preprocessing is DOMAIN.md section 2's ColumnTransformer: a normal-output
QuantileTransformer on the 8 continuous features, passthrough on the 4 flags. It is fitted
on a plain numpy array (no column names), so it applies to raw arrays later, and only on
training rows.

The sample is split 50/40/10 into train/test/validation by a seeded permutation (so the
shards are also shuffled). Each split directory holds `part-NNNNN.feather` shards with
the PREPROCESSED features under the feature names, the raw one-hot labels, and extra
columns: the raw features (`raw_<name>`), the pid, the true probabilities and `row_id`
(the row's index in the sample).
"""

import argparse
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from effgen import schema
from effgen.atomic import atomic_file, atomic_outputs
from effgen.data.reader import DataError, check_finite, check_schema, write_definitions
from effgen.errors import (
    EffgenError,
    PreprocessingError,  # noqa: F401 (re-exported)
)

SPLITS = {"train": 0.5, "test": 0.4, "validation": 0.1}
RAW_PREFIX = "raw_"
ROW_ID = "row_id"
REQUIRED = schema.FEATURES + [schema.PID] + schema.LABELS + schema.TRUTH
EXTRA = [RAW_PREFIX + c for c in schema.FEATURES] + [schema.PID] + schema.TRUTH + [ROW_ID]
N_CONTINUOUS = len(schema.CONTINUOUS_FEATURES)
N_FEATURES = len(schema.FEATURES)




def fit_preprocessing(X_raw: np.ndarray, seed: int):
    """Fit the ColumnTransformer on an (n, 12) numpy array of raw features."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import QuantileTransformer

    X_raw = np.asarray(X_raw)
    if X_raw.ndim != 2 or X_raw.shape[1] != N_FEATURES:
        raise ValueError(f"expected an (n, {N_FEATURES}) array of raw features, got {X_raw.shape}")
    ct = ColumnTransformer([
        ("quantile", QuantileTransformer(output_distribution="normal", random_state=seed),
         list(range(N_CONTINUOUS))),
        ("flags", "passthrough", list(range(N_CONTINUOUS, N_FEATURES))),
    ])
    return ct.fit(X_raw.astype(np.float64))


def save_preprocessing(ct, path):
    with atomic_file(path) as f:
        pickle.dump(ct, f, protocol=pickle.HIGHEST_PROTOCOL)




def open_sample(path) -> pa.Table:
    """The sample as a memory-mapped Arrow table, after checking its columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input sample is missing (run `effgen synth` first)")
    try:
        table = ipc.open_file(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable feather sample: {err}") from err
    check_schema(path, table.schema, REQUIRED)
    if table.num_rows == 0:
        raise DataError(f"{path}: the sample has no rows")
    # NaN would pass silently through the quantile fit (sklearn ignores it) and poison training.
    for name in schema.FEATURES + schema.LABELS:
        check_finite(path, name, table.column(name).to_numpy())
    return table


def split_indices(n: int, seed: int, fractions=SPLITS) -> dict:
    """Disjoint, complete, shuffled row indices per split, sized by `fractions`."""
    perm = np.random.default_rng(np.random.SeedSequence(seed)).permutation(n)
    bounds = np.round(np.cumsum([0.0] + list(fractions.values())) / sum(fractions.values()) * n)
    bounds = bounds.astype(np.int64)
    return {name: perm[lo:hi] for name, lo, hi in zip(fractions, bounds[:-1], bounds[1:])}


def _raw_features(table: pa.Table, rows: np.ndarray) -> np.ndarray:
    sub = table.select(schema.FEATURES).take(pa.array(rows))
    return np.stack([sub.column(c).to_numpy() for c in schema.FEATURES], axis=1).astype(np.float32)


def _shard_table(table, rows, ct) -> pa.Table:
    sub = table.select(REQUIRED).take(pa.array(rows))
    raw = np.stack([sub.column(c).to_numpy() for c in schema.FEATURES], axis=1).astype(np.float32)
    pre = ct.transform(raw.astype(np.float64)).astype(np.float32)
    cols = {name: pre[:, j] for j, name in enumerate(schema.FEATURES)}
    for name in schema.LABELS:
        cols[name] = sub.column(name).cast(pa.float32())
    for j, name in enumerate(schema.FEATURES):
        cols[RAW_PREFIX + name] = raw[:, j]
    cols[schema.PID] = sub.column(schema.PID).cast(pa.int32())
    for name in schema.TRUTH:
        cols[name] = sub.column(name).cast(pa.float32())
    cols[ROW_ID] = pa.array(rows.astype(np.int64))
    return pa.table(cols)


def _write_shard(table: pa.Table, path: Path):
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def preprocess(input_path, output_dir, preprocessing_path, seed, force=False,
               shard_rows=500_000, max_fit_rows=1_000_000, progress=True) -> dict:
    """Fit the preprocessing on training rows and write the three split directories.

    All outputs are refused up front if they exist (unless force); the split
    directories and the pickle are built under temporary names and renamed together,
    back to back, only once everything has been written: a kill leaves the old outputs
    or the new ones, a mix only if it lands within the microseconds of the renames."""
    from tqdm import tqdm

    output_dir = Path(output_dir)
    preprocessing_path = Path(preprocessing_path)
    out_dirs = {name: output_dir / name for name in SPLITS}
    if not force:
        for d in out_dirs.values():
            if d.exists() and any(d.iterdir()):
                raise FileExistsError(f"{d} exists and is not empty (use --force to replace it)")
        if preprocessing_path.exists():
            raise FileExistsError(f"{preprocessing_path} exists (use --force to replace it)")
    if shard_rows <= 0 or max_fit_rows <= 0:
        raise ValueError("shard_rows and max_fit_rows must be positive")

    table = open_sample(input_path)
    splits = split_indices(table.num_rows, seed)
    empty = [name for name, rows in splits.items() if len(rows) == 0]
    if empty:  # refused before anything is written
        raise DataError(f"{input_path}: too few rows ({table.num_rows}) to split: the "
                        f"{', '.join(empty)} split would be empty")
    # Train rows are already a random permutation: the first ones are a random subset.
    ct = fit_preprocessing(_raw_features(table, splits["train"][:max_fit_rows]), seed)

    blob = pickle.dumps(ct, protocol=pickle.HIGHEST_PROTOCOL)
    sha = hashlib.sha256(blob).hexdigest()
    with atomic_outputs() as staged, tqdm(total=table.num_rows, unit="row", unit_scale=True,
                                         desc="preprocess", disable=not progress) as bar:
        for name, rows in splits.items():
            tmp = staged.dir(out_dirs[name], force=force)
            for k, start in enumerate(range(0, len(rows), shard_rows)):
                chunk = rows[start:start + shard_rows]
                _write_shard(_shard_table(table, chunk, ct), tmp / f"part-{k:05d}.feather")
                bar.update(len(chunk))
            write_definitions(tmp, schema.FEATURES, schema.LABELS, EXTRA, preprocessing_sha256=sha)
        # Staged last, so renamed last: a replaced pickle means every split is new too.
        with staged.file(preprocessing_path) as f:
            f.write(blob)
    return {**out_dirs, "preprocessing": preprocessing_path,
            "rows": {name: len(rows) for name, rows in splits.items()}}


def register(subparsers):
    from effgen.config import add_knob, default_paths

    paths = default_paths()
    p = subparsers.add_parser("preprocess", help="fit the preprocessing, split and shard the sample")
    p.add_argument("--input", type=Path, default=paths["sample"])
    p.add_argument("--output-dir", type=Path, default=paths["train"].parent,
                   help="where train/, test/ and validation/ are written")
    p.add_argument("--preprocessing", type=Path, default=paths["preprocessing"],
                   help="pickled ColumnTransformer (tX.pkl)")
    add_knob(p, "--seed", "SEED")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("--max-fit-rows", type=int, default=1_000_000,
                   help="training rows the preprocessing is fitted on")
    p.add_argument("--shard-rows", type=int, default=500_000)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace):
    try:
        out = preprocess(args.input, args.output_dir, args.preprocessing, args.seed,
                         force=args.force, shard_rows=args.shard_rows,
                         max_fit_rows=args.max_fit_rows)
    except (FileExistsError, DataError, ValueError) as err:
        raise EffgenError(str(err)) from err
    counts = ", ".join(f"{k} {v}" for k, v in out["rows"].items())
    print(f"effgen preprocess: wrote {counts} rows under {args.output_dir}; "
          f"preprocessing {args.preprocessing}")
    return 0
