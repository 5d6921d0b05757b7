"""Data benchmarks: the reader's throughput, and preprocessing's speed and memory.

    python -m effgen.bench.data [--rows N] [--repeats R]
    python -m effgen.bench.data --preprocess-rows 2000000 20000000 [--baseline-max-rows N]

Preprocessing: `effgen preprocess` (streaming, ROOT tuple -> shards) against the seed
notebook's design re-implemented (the whole tuple in memory with uproot.concatenate into
pandas, the derivations, a fit on the first 1M rows, a random split, sklearn's transform),
each in a fresh process on the same synthetic ROOT tuple: wall seconds (rows/s, end to
end from process start) and peak resident memory (the child's ru_maxrss).

Reader:
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

from effgen import schema
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
        sample = root / f"sample-{rows}.root"
        if not sample.exists():
            synth.write_sample(sample, rows, seed)
        preprocess.preprocess(sample, data, data / "tX.pkl", seed, force=True)
    return data / "train"


# ---- preprocessing ---------------------------------------------------------------------

def notebook_preprocess(inputs, output_dir, seed, shard_rows=500_000, fit_rows=1_000_000):
    """The seed notebook's design: every branch of every file in memory at once."""
    import pandas as pd
    import uproot

    from effgen.data import derive, preprocess

    frame = uproot.concatenate([f"{f}:{derive.TREE}" for f in inputs], derive.REQUIRED, library="pd")
    frame = frame[frame["acceptance"] <= 1]
    frame = frame[(frame["mc_pz"] > 0) & (frame["mc_charge"] != 0)]
    frame["mc_log10_p"] = (np.log(frame["mc_p"]) / np.log(10)).astype(np.float32)
    frame["mc_tx"] = frame["mc_px"] / frame["mc_pz"]
    frame["mc_ty"] = frame["mc_py"] / frame["mc_pz"]
    pid = frame["mcID"].abs()
    frame["mc_is_e"] = (pid == 11).astype(np.float32)
    frame["mc_is_mu"] = (pid == 13).astype(np.float32)
    frame["mc_is_h"] = pid.isin(derive.HADRONS).astype(np.float32)
    for j, code in enumerate((3, 4, 5), start=1):
        frame[schema.LABELS[j]] = (frame["type"] == code).astype(np.float32)
    frame["not_recoed"] = (~frame["type"].isin([3, 4, 5])).astype(np.float32)
    X = frame[schema.FEATURES].to_numpy(np.float64)
    ct = preprocess.fit_preprocessing(X[:fit_rows], seed)
    which = np.random.default_rng(seed).choice(3, size=len(frame), p=[0.5, 0.4, 0.1])
    output_dir = Path(output_dir)
    for k, name in enumerate(preprocess.SPLITS):
        (output_dir / name).mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(which == k)
        for i, lo in enumerate(range(0, len(rows), shard_rows)):
            part = rows[lo:lo + shard_rows]
            cols = dict(zip(schema.FEATURES, ct.transform(X[part]).astype(np.float32).T))
            cols.update({c: frame[c].to_numpy()[part] for c in schema.LABELS})
            pd.DataFrame(cols).to_feather(output_dir / name / f"part-{i:05d}.feather")
    return len(frame)


def ensure_tuple(root: Path, rows: int, seed: int = 1, zlib: bool = False) -> Path:
    """A synthetic ROOT tuple of `rows` particles under root (made once): uncompressed, or
    with `zlib` compressed as uproot writes by default (ZLIB level 1), like real tuples."""
    from effgen.data import synth

    path = Path(root) / f"tuple-{rows}{'-zlib1' if zlib else ''}.root"
    if not path.exists():
        import uproot

        synth.write_sample(path, rows, seed, progress=False,
                           root_compression=uproot.ZLIB(1) if zlib else None)
    return path


def _measure(cmd):
    """(wall seconds, peak RSS in MB, CPU seconds) of a child process; BenchError if it
    fails. CPU seconds (user + system) tell the work apart from a busy machine's waits."""
    import os
    import subprocess

    from effgen.errors import BenchError

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


PREPROCESS_CASES = ("effgen preprocess (streaming)", "notebook design (all in memory)",
                    "effgen preprocess, ZLIB-1 tuple")


def bench_preprocess(root, rows, repeats=1, seed=1, baseline=True, zlib=True) -> list:
    """One dict per case: case, rows, runs (seconds), rss_mb (peak, per run). With `zlib`,
    also effgen on the same rows in a ZLIB-compressed tuple (decompression included)."""
    import os
    import shutil
    import sys

    root = Path(root)
    sample = ensure_tuple(root, rows, seed)
    out = root / f"out-{rows}"

    def effgen_cmd(tuple_path):
        return [sys.executable, "-m", "effgen", "preprocess", "--input", str(tuple_path),
                "--output-dir", str(out / "data"), "--preprocessing", str(out / "tX.pkl"),
                "--seed", str(seed), "--force"]

    cmds = {PREPROCESS_CASES[0]: effgen_cmd(sample)}
    if zlib:
        cmds[PREPROCESS_CASES[2]] = effgen_cmd(ensure_tuple(root, rows, seed, zlib=True))
    if baseline:  # last: the bench's ratios are against it
        cmds[PREPROCESS_CASES[1]] = [sys.executable, "-m", "effgen.bench.data", "--notebook-baseline",
                                     str(sample), str(out / "notebook"), "--seed", str(seed)]
    results = []
    for case, cmd in cmds.items():
        runs, rss, cpu = [], [], []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            seconds, mb, cpu_s = _measure(cmd)
            runs.append(seconds)
            rss.append(mb)
            cpu.append(cpu_s)
        results.append({"case": case, "rows": rows, "runs_s": runs, "rows_per_s": [rows / s for s in runs],
                        "peak_rss_mb": rss, "cpu_s": cpu, "load_average": list(os.getloadavg())})
    shutil.rmtree(out, ignore_errors=True)
    return results


def format_preprocess_table(results) -> str:
    lines = [f"{'case':34s} {'rows':>11s} {'seconds':>8s} {'M rows/s':>9s} {'CPU s':>7s} "
             f"{'M rows/CPU s':>12s} {'peak RSS MB':>12s}"]
    for r in results:
        cpu = statistics.median(r["cpu_s"])
        lines.append(f"{r['case']:34s} {r['rows']:>11,d} {statistics.median(r['runs_s']):>8.1f} "
                     f"{statistics.median(r['rows_per_s']) / 1e6:>9.3f} {cpu:>7.1f} "
                     f"{r['rows'] / cpu / 1e6:>12.3f} {max(r['peak_rss_mb']):>12.0f}")
    return "\n".join(lines)


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
    p.add_argument("--preprocess-rows", type=int, nargs="+",
                   help="instead of the reader: time and peak memory of preprocessing tuples of these sizes")
    p.add_argument("--baseline-max-rows", type=int, default=2_000_000,
                   help="largest size the in-memory notebook baseline is run at")
    p.add_argument("--notebook-baseline", nargs=2, metavar=("INPUT", "OUTPUT_DIR"),
                   help=argparse.SUPPRESS)  # the baseline's child process
    p.add_argument("--no-zlib", action="store_true",
                   help="skip the ZLIB-compressed tuple's case (its tuple is written once, slowly)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.notebook_baseline:
        n = notebook_preprocess([args.notebook_baseline[0]], args.notebook_baseline[1], args.seed)
        print(f"notebook baseline: {n} rows")
        return 0

    root = default_paths()["bench"] / "data"
    if args.preprocess_rows:
        results = []
        for rows in args.preprocess_rows:
            results += bench_preprocess(root, rows, args.repeats, args.seed,
                                        baseline=rows <= args.baseline_max_rows, zlib=not args.no_zlib)
            print(format_preprocess_table(results), flush=True)
        with atomic_file(root / "preprocess.json", "w") as f:
            json.dump(results, f, indent=2)
        print(f"results: {root / 'preprocess.json'}")
        return 0
    train = ensure_dataset(root, args.rows)
    results = bench_reader(train, args.batch_size, args.repeats, args.original_max_rows)
    print(format_table(results))
    with atomic_file(root / "reader.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"results: {root / 'reader.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
