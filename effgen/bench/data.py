"""Reader throughput: effgen's FeatherReader against the seed notebook's design.

    python -m effgen.bench.data [--rows N] [--repeats R]

synthesises and preprocesses a sample under <workdir>/bench/data/ if needed, then
measures rows/s of `as_tf_dataset().batch(100_000)` on the training split against a
re-implementation of the original reader (one file at a time, through
`tf.data.Dataset.from_generator` yielding one row at a time, then `.batch`) and against
plain TensorFlow block unbatching (`from_generator` of blocks, `.unbatch().batch()`),
all in the same process, medians of `repeats` passes after a warm-up pass.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from effgen.data.reader import FeatherReader


def original_tf_dataset(reader: FeatherReader):
    """The seed notebook's reader, re-implemented: each shard read whole, then rows
    handed to TensorFlow one by one from a Python generator."""
    import pandas as pd
    import tensorflow as tf

    def rows():
        for file in reader.data_files:
            frame = pd.read_feather(file)
            X = frame[reader.features].to_numpy(np.float32)
            y = frame[reader.labels].to_numpy(np.float32)
            for i in range(len(frame)):
                yield X[i], y[i]

    signature = (tf.TensorSpec((len(reader.features),), tf.float32),
                 tf.TensorSpec((len(reader.labels),), tf.float32))
    return tf.data.Dataset.from_generator(rows, output_signature=signature)


def unbatch_batch_tf_dataset(reader: FeatherReader, batch_size):
    """Blocks from the same reader, unbatched and batched again row by row by
    TensorFlow (the base class' batch, bypassing the reader's rebatch override)."""
    import tensorflow as tf

    return tf.data.Dataset.batch(reader.as_tf_dataset(), batch_size)


def _pass(dataset, max_rows):
    """Seconds and rows for one pass over `dataset` (batched), stopping at max_rows."""
    rows, start = 0, time.perf_counter()
    for x, _ in dataset:
        rows += int(x.shape[0])
        if max_rows is not None and rows >= max_rows:
            break
    return time.perf_counter() - start, rows


def bench_reader(path, batch_size=100_000, repeats=3, original_max_rows=50_000,
                 progress=True) -> list:
    """One dict per reader: name, rows per pass, median rows/s, all runs, speedup
    against the original design."""
    reader = FeatherReader(path)
    cases = [
        ("effgen as_tf_dataset().batch", lambda: reader.as_tf_dataset().batch(batch_size), None),
        ("tf blocks .unbatch().batch", lambda: unbatch_batch_tf_dataset(reader, batch_size), None),
        ("original from_generator per row", lambda: original_tf_dataset(reader).batch(batch_size),
         original_max_rows),
    ]
    results = []
    for name, make, max_rows in cases:
        dataset = make()
        if max_rows is None:  # warm-up (page cache, tracing); the original is too slow to care
            _pass(dataset, max_rows)
        runs = []
        for _ in range(repeats):
            seconds, rows = _pass(dataset, max_rows)
            runs.append(rows / seconds)
            if progress:
                print(f"  {name}: {rows} rows in {seconds:.3f} s", flush=True)
        results.append({"reader": name, "rows": rows, "batch_size": batch_size,
                        "rows_per_s": statistics.median(runs), "runs_rows_per_s": runs})
    original = results[-1]["rows_per_s"]
    for r in results:
        r["speedup_vs_original"] = r["rows_per_s"] / original
    return results


def ensure_dataset(root: Path, rows: int, seed: int = 1) -> Path:
    """A preprocessed sample of `rows` rows under root (made once); its train dir."""
    from effgen.data import preprocess, synth

    data = root / f"rows-{rows}"
    if not (data / "train" / "definitions.json").exists():
        sample = root / f"sample-{rows}.feather"
        if not sample.exists():
            synth.write_sample(sample, rows, seed)
        preprocess.preprocess(sample, data, data / "tX.pkl", seed, force=True)
    return data / "train"


def format_table(results) -> str:
    lines = [f"{'reader':34s} {'rows':>10s} {'M rows/s':>9s} {'x original':>11s}"]
    for r in results:
        lines.append(f"{r['reader']:34s} {r['rows']:>10d} {r['rows_per_s'] / 1e6:>9.3f} "
                     f"{r['speedup_vs_original']:>11.1f}")
    return "\n".join(lines)


def main(argv=None):
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from effgen.atomic import atomic_file
    from effgen.config import default_paths

    p = argparse.ArgumentParser(prog="python -m effgen.bench.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4_000_000,
                   help="sample size; the benchmark reads its 50%% training split")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=100_000)
    p.add_argument("--original-max-rows", type=int, default=50_000,
                   help="rows per pass for the (slow) original reader")
    args = p.parse_args(argv)

    root = default_paths()["bench"] / "data"
    train = ensure_dataset(root, args.rows)
    results = bench_reader(train, args.batch_size, args.repeats, args.original_max_rows)
    print(format_table(results))
    with atomic_file(root / "reader.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"results: {root / 'reader.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
