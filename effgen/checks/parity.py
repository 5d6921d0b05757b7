"""`effgen parity`: the compiled efficiency function against TensorFlow.

Targets. The library Lamarr will load (`--library`, opened with cffi in ABI mode,
declarations taken from the generated header) and, from the generated C (`--source`),
cffi API-mode builds of the same code: `production` (-std=c99 -O3), `portable`
(the same plus -DEFFGEN_NO_DISPATCH: plain C99, no CPU dispatch) and `sanitize`
(-fsanitize=address,undefined, run with libasan preloaded). Every target runs in its own
subprocess (a crash is reported, not inherited; ASan needs its runtime first).

Reference. model.keras run by TensorFlow on the same raw rows passed through the pickled
preprocessing (float64 transform, float32 network input, as `effgen preprocess` does).

Checks, per target:
  values     per class max / mean |C - TF| through `efficiency` (one call per row, as
             SQLamarr calls it) and through `efficiency_batch`, worst rows listed;
             against the backend's stated tolerance (TOLERANCES) for the whole function,
             and for the network alone where the source exposes it (API builds).
  lamarr     outputs in [0, 1] and p0 + 0 + 0 + p1 + p2 (float) <= 1, else Lamarr aborts.
  draws      one seeded float32 uniform per row: C `efficiency_track_type` against
             random_category applied to TF's probabilities (checks.random_category).
             A disagreement is rounding only if r lies within the value tolerance
             (times the number of summed terms) of one of TF's cumulative boundaries;
             any other fails. C's draw against its own probabilities must agree always.
Draw distribution (primary target): `--draws` fresh draws from the C library over the
rows; class counts against expected counts (sums of TF probabilities), overall and per
momentum bin (edges 0.5, 3, 5, 10, 30, 100, 200 GeV/c plus under/overflow), Pearson
chi-square with sparse cells merged; fails at p < 1e-3 in any test. (Rows have
different probabilities, so the counts are Poisson-binomial: the test is conservative.)

Outputs: report.json, differences.png, summary.txt in --output-dir; exit status 0/1.

Modules: parity_build (targets), parity_worker (the subprocess), parity_compare (the
per-target checks), draws and random_category (draw statistics and references),
parity_report (plot and summary); this module runs them in order and holds the CLI.
The backend and the core's function names (the network alone) come from the
manifest export writes beside the source (<symbol>.json), never from the C text.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.checks.draws import P_VALUE_MIN, draw_distribution
from effgen.checks.parity_build import VARIANTS, abi_spec, build_api_variant, build_helpers
from effgen.checks.parity_compare import TOLERANCES, backend_of, check_target, provenance_failures
from effgen.checks.parity_report import plot_differences, summary
from effgen.checks.parity_worker import main as worker_main
from effgen.checks.parity_worker import run_worker
from effgen.codegen.export import manifest_path
from effgen.codegen.symbols import check_symbol
from effgen.errors import ParityError  # noqa: F401 (re-exported)
from effgen.provenance import sha256_of

DEFAULT_ROWS = 200_000
DEFAULT_DRAWS = 1_000_000
DEFAULT_SANITIZE_ROWS = 20_000  # ASan/UBSan find memory and UB errors per call, not per row count


# ---- the reference -------------------------------------------------------------------
def load_rows(data_dir, n_rows) -> np.ndarray:
    """The first n_rows raw feature rows (raw_<feature> columns) of a data directory."""
    from effgen.data.reader import FeatherReader

    reader = FeatherReader(data_dir)
    cols = [f"raw_{c}" for c in schema.FEATURES]
    missing = [c for c in cols if c not in reader.columns]
    if missing:
        raise ParityError(f"{data_dir}: no raw feature columns {missing} (written by effgen preprocess)")
    frame = reader.as_pandas(columns=cols, max_rows=n_rows)
    return frame.to_numpy(dtype=np.float32)


def tf_reference(model_path, preprocessing, raw, batch_size=65536):
    """(probabilities, preprocessed input), both float32, from TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    model = keras.models.load_model(str(model_path), compile=False)
    pre = preprocessing.transform(np.asarray(raw, dtype=np.float64)).astype(np.float32)
    probs = model.predict(pre, batch_size=batch_size, verbose=0).astype(np.float32)
    return probs, pre


def source_manifest(source) -> dict:
    """The manifest export wrote beside a generated source: backend, kind, outputs and
    the core's function names."""
    path = manifest_path(source)
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ParityError(f"no manifest {path} beside {source} (effgen export writes it; "
                          f"re-export the source)") from None
    except (OSError, ValueError) as err:
        raise ParityError(f"manifest {path} is not readable JSON: {err}") from err


def run_parity(*, model_path, preprocessing_path, raw=None, data_dir=None, library=None,
               source=None, header=None, symbol="efficiency", rows=DEFAULT_ROWS,
               draws=DEFAULT_DRAWS, variants=("production", "portable", "sanitize"),
               sanitize_rows=DEFAULT_SANITIZE_ROWS, output_dir="build/parity", seed=12345,
               worker_timeout=3600, progress=True) -> dict:
    """Run every check; write report.json, differences.png and summary.txt into
    output_dir and return the report (report['passed'] is the verdict).

    Rows: `raw` (n x 12 float32) or the first `rows` of `data_dir`'s raw_<feature>
    columns. Targets: `library` (ABI mode) and `variants` API builds of `source`.
    The first target gives the `draws` for the distribution test."""
    import sysconfig

    from effgen.atomic import atomic_file
    from effgen.provenance import load_preprocessing

    t_start = time.perf_counter()
    output_dir = Path(output_dir)
    work = output_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)

    if library is None and source is None:
        raise ParityError("nothing to check: give a library (.so) and/or its generated source (.c)")
    if source is not None:
        source = Path(source)
        header = Path(header) if header else source.with_suffix(".h")
    elif library is not None and header is None:
        header = Path(library).with_suffix(".h")
    if header is None or not Path(header).is_file():
        raise ParityError(f"generated header {header} not found (needed for the declarations)")
    for v in variants:
        if v not in VARIANTS:
            raise ParityError(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
    # What export recorded: the backend and the core's network-alone function.
    built = source_manifest(source) if source is not None else {}
    backend = built.get("backend")
    net_fn = (built.get("functions") or {}).get("network")
    n_outputs = len(built.get("outputs") or schema.OUTPUTS)
    if raw is None:
        if data_dir is None:
            raise ParityError("no rows: give data_dir (a validation directory) or raw")
        raw = load_rows(data_dir, rows)
    raw = np.ascontiguousarray(raw[:rows], dtype=np.float32)
    n = len(raw)
    if n == 0:
        raise ParityError("no rows to check")

    say(f"parity: TensorFlow reference on {n} rows")
    tf_probs, pre = tf_reference(model_path, load_preprocessing(preprocessing_path, model_path=model_path), raw)

    rng = np.random.default_rng(np.random.SeedSequence(seed))
    uniforms = rng.random(n, dtype=np.float32)
    draw_uniforms = rng.random(int(draws), dtype=np.float32) if draws else None

    targets = []
    if library is not None:
        targets.append(abi_spec(library, header, build_helpers(work / "build"), symbol=symbol))
    build_failures = {}
    if source is not None:
        for v in variants:
            say(f"parity: building {v} ({' '.join(VARIANTS[v]['cflags'])})")
            try:
                targets.append(build_api_variant(source, header, work / "build", v,
                                                 symbol=symbol, network_fn=net_fn))
            except ParityError as err:
                build_failures[v] = f"{v}: does not build: {err}"
    if not targets and not build_failures:
        raise ParityError("no target to run (a source with an empty variant list)")
    report = {"model": str(model_path), "preprocessing": str(preprocessing_path),
              "data": str(data_dir) if data_dir else None,
              "library": str(library) if library else None,
              "source": str(source) if source else None, "symbol": symbol, "rows": n,
              "seed": seed, "backend": backend, "network_function": net_fn,
              "targets": {}, "failures": [],
              # cffi builds add Python's own flags before each variant's flags.
              "python_cflags": sysconfig.get_config_var("CFLAGS")}
    for v, msg in build_failures.items():
        report["targets"][v] = {"passed": False, "failures": [msg]}
        report["failures"].append(msg[:3000])
    hashes = {"model_sha256": sha256_of(model_path), "preprocessing_sha256": sha256_of(preprocessing_path)}
    report.update(hashes)
    primary = targets[0]["variant"] if targets else None
    results = {}
    for spec in targets:
        spec["n_outputs"] = n_outputs
        name = spec["variant"]
        m = n if not spec.get("sanitizer") else min(n, sanitize_rows)
        with_draws = name == primary and draw_uniforms is not None
        say(f"parity: running {name} on {m} rows" + (f" + {len(draw_uniforms)} draws" if with_draws else ""))
        try:
            res = run_worker(spec, work, raw[:m], uniforms[:m], draw_uniforms if with_draws else None,
                             pre[:m] if spec.get("network") else None, timeout=worker_timeout)
        except (ParityError, subprocess.TimeoutExpired) as err:
            report["targets"][name] = {"passed": False, "failures": [f"{name}: {err}"]}
            report["failures"].append(f"{name}: crashed or sanitizer report: {str(err)[:2000]}")
            continue
        if report["backend"] is None:
            report["backend"] = backend_of(res["manifest"])
        tol = TOLERANCES[backend_of(res["manifest"])]
        chk = check_target(name, res, tf_probs[:m], raw[:m], uniforms[:m], tol, pre[:m])
        chk["failures"] += provenance_failures(name, res["manifest"], hashes)
        chk["passed"] = not chk["failures"]
        chk.update(rows=m, backend=backend_of(res["manifest"]), tolerances=tol,
                   build={k: spec[k] for k in ("kind", "cflags") if k in spec})
        report["targets"][name] = chk
        report["failures"] += chk["failures"]
        results[name] = res
        if "draws" in res:
            dist = draw_distribution(res["draws"], tf_probs[:m], raw[:m, schema.FEATURES.index("mc_log10_p")])
            dist["target"] = name
            report["draw_distribution"] = dist
            if not dist["passed"]:
                report["failures"].append(
                    f"draw distribution ({name}): p < {P_VALUE_MIN:g} in {dist['failing_tests']}"
                    + (f"; {dist['other_types']} draws outside 0/3/4/5" if dist["other_types"] else ""))
    if draws and "draw_distribution" not in report:
        report["failures"].append(f"draw distribution: the primary target {primary} gave no draws")
    if source is not None and not net_fn:
        report["failures"].append(f"network alone: no network function of the {backend} backend "
                                  f"in {source}")
    report["passed"] = not report["failures"]
    report["runtime_s"] = time.perf_counter() - t_start

    with atomic_file(output_dir / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    plot_differences(results, tf_probs, output_dir / "differences.png")
    with atomic_file(output_dir / "summary.txt", "w") as f:
        f.write(summary(report) + "\n")
    return report


# ---- CLI -----------------------------------------------------------------------------
def register(subparsers):
    from effgen.config import default_paths

    paths = default_paths()
    p = subparsers.add_parser("parity", help="check the compiled library against TensorFlow",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--library", default=str(paths["lamarr"] / "efficiency.so"),
                   help="the .so Lamarr loads (ABI mode)")
    p.add_argument("--source", help="generated C to build variants from (default: LIBRARY with .c, if present)")
    p.add_argument("--header", help="generated header (default: SOURCE or LIBRARY with .h)")
    p.add_argument("--symbol", default="efficiency")
    p.add_argument("--model", default=str(paths["model"]))
    p.add_argument("--preprocessing", default=str(paths["preprocessing"]))
    p.add_argument("--data", default=str(paths["validation"]), help="validation data directory")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS)
    p.add_argument("--sanitize-rows", type=int, default=DEFAULT_SANITIZE_ROWS)
    p.add_argument("--output-dir", default=str(paths["parity"]))
    p.add_argument("--variants", default="production,portable,sanitize",
                   help="comma-separated API-mode builds of SOURCE (empty for none)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--spec", help="check every symbol of a spec's library (effgen export --spec "
                                  "--compile; --library defaults to <lamarr dir>/<spec stem>.so) "
                                  "against Keras + scikit-learn on --rows drawn rows")
    p.add_argument("--per-row-rows", type=int, default=None,
                   help="with --spec: rows also run one call at a time (default: all)")
    p.set_defaults(func=_main)


def _main_spec(args) -> int:
    """`effgen parity --spec`: every kind, effgen.checks.parity_kinds."""
    from effgen.checks.parity_kinds import run_spec_parity
    from effgen.checks.parity_kinds import summary as spec_summary
    from effgen.config import default_paths

    library = Path(args.library)
    if library == default_paths()["lamarr"] / "efficiency.so":
        library = library.with_name(Path(args.spec).stem + ".so")
    report = run_spec_parity(args.spec, library, rows=args.rows, per_row_rows=args.per_row_rows,
                             seed=args.seed, output_dir=args.output_dir)
    print(spec_summary(report))
    print(f"report: {Path(args.output_dir) / 'report.json'}")
    return 0 if report["passed"] else 1


def _main(args) -> int:
    check_symbol(args.symbol)  # a bad name is refused before any model is loaded or built
    if args.spec:
        return _main_spec(args)
    library = Path(args.library) if args.library else None
    source = Path(args.source) if args.source else None
    if library is not None and not library.is_file():
        print(f"effgen parity: library {library} does not exist (make lamarr-lib)", file=sys.stderr)
        return 1
    if source is None and library is not None and library.with_suffix(".c").is_file():
        source = library.with_suffix(".c")
    variants = [v for v in args.variants.split(",") if v]
    try:
        report = run_parity(model_path=args.model, preprocessing_path=args.preprocessing,
                            data_dir=args.data, library=library, source=source,
                            header=args.header, symbol=args.symbol, rows=args.rows,
                            draws=args.draws, variants=variants if source else (),
                            sanitize_rows=args.sanitize_rows, output_dir=args.output_dir,
                            seed=args.seed)
    except ParityError as err:
        print(f"effgen parity: {err}", file=sys.stderr)
        return 1
    print(summary(report))
    print(f"report: {Path(args.output_dir) / 'report.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":  # the worker's former entry point, kept working
    sys.exit(worker_main(sys.argv[1:]))
