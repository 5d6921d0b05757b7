"""`effgen describe LIB.so` (also `effgen export --describe LIB.so`): a built library's
exports and, for every symbol it exports (one efficiency.so, or a tracking.so built by
`effgen export --spec --compile`), its kind, inputs, outputs, n_random, hashes, the
whole embedded manifest and a short parity check against Keras (+ scikit-learn).

The parity check of a symbol needs its model, tX and (generators) tY. They are, in
this order: the files named on the command line (--model, --preprocessing,
--postprocessing; for the symbol --symbol names, else for the one symbol whose
manifest records that model's sha256), the [[model]] table of --spec, or the files
named in the manifest (`model_file`, ...) found beside the library (in
<library dir>/<symbol>/ or <library dir>/, tX and tY also beside the model). A file
nobody named is used only if its sha256 is the one the manifest records: the library
vouches for it, as history.json vouches for a default tX.pkl. Without them the check
is skipped and says so."""

import ctypes
import json
import sys
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.codegen.export import load_model
from effgen.codegen.kinds import EFFICIENCY, get_kind
from effgen.codegen.native import Library, exported_symbols, undefined_symbols
from effgen.codegen.symbols import check_symbol
from effgen.config import default_paths
from effgen.data.reader import FeatherReader
from effgen.errors import ConfigError, ExportError, PreprocessingError
from effgen.provenance import load_preprocessing, sha256_of, trained_order, vouched_default

FILES = ("model", "preprocessing", "postprocessing")
DEFAULT_NAMES = {"model": "model.keras", "preprocessing": "tX.pkl", "postprocessing": "tY.pkl"}
KIND_ROWS_PER_CALL = 1000  # sigmoid / generator parity: rows also run one call at a time


def library_symbols(exported) -> list:
    """The model symbols of a library: every `<symbol>_manifest` it exports."""
    names = [s[: -len("_manifest")] for s in exported if s.endswith("_manifest")]
    if not names:
        raise ExportError(f"no <symbol>_manifest among the exports {exported}: not an effgen library")
    return names


def read_manifest(library, symbol) -> dict:
    """The JSON that `<symbol>_manifest()` returns."""
    fn = getattr(ctypes.CDLL(str(Path(library).resolve())), symbol + "_manifest")
    fn.restype = ctypes.c_char_p
    try:
        return json.loads(fn().decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{library}: {symbol}_manifest() is not JSON ({err})") from None


def abi_problems(library, manifests, exported) -> list:
    """What is wrong with the library's exports (exactly every symbol's kind's names)
    and imports (no glibc __*_finite, gone from recent glibc)."""
    problems = []
    try:
        expected = sorted(n for s, m in manifests.items()
                          for n in get_kind(m.get("kind", EFFICIENCY.name)).exported_names(s))
    except ValueError as err:
        return [str(err)]
    if exported != expected:
        problems.append(f"exports {exported}, expected exactly {expected}")
    finite = [n for n in undefined_symbols(library) if n.startswith("__") and n.endswith("_finite")]
    if finite:
        problems.append(f"imports {finite} (built with -ffast-math?); they are gone from recent glibc")
    return problems


def _matches(path, manifest, key) -> bool:
    want = manifest.get(f"{key}_sha256")
    return want is not None and Path(path).is_file() and sha256_of(path) == want


def locate_files(library, symbol, manifest, *, given=None, spec_entry=None) -> tuple:
    """({model, preprocessing[, postprocessing]} or None, notes): the files a parity
    check of `symbol` uses (see the module docstring), with what was found or not."""
    needed = ["model", "preprocessing"] + (["postprocessing"] if manifest.get("postprocessing_sha256")
                                           else [])
    for origin, chosen in (("named on the command line", given), ("from the spec", spec_entry)):
        if chosen and chosen.get("model") is not None:
            files = {k: Path(chosen[k]) for k in needed if chosen.get(k) is not None}
            missing = [f"{k} {files[k]}" if k in files else k for k in needed
                       if k not in files or not files[k].is_file()]
            if missing:
                return None, [f"{origin}: missing {', '.join(missing)}"]
            stale = [k for k in needed if manifest.get(f"{k}_sha256") not in (None, sha256_of(files[k]))]
            notes = [f"{origin}: " + ", ".join(f"{k} {p}" for k, p in files.items())]
            if stale:
                notes.append(f"WARNING: the library was not built from these {', '.join(stale)} "
                             f"file(s) (sha256 differs from its manifest)")
            return files, notes
    lib_dir = Path(library).resolve().parent
    files = {}
    for key in needed:
        name = manifest.get(f"{key}_file") or DEFAULT_NAMES[key]
        dirs = ([files["model"].parent] if "model" in files else []) + [lib_dir / symbol, lib_dir]
        found = next((d / name for d in dirs if _matches(d / name, manifest, key)), None)
        if found is None:
            return None, [f"no {key} file {name!r} with the manifest's sha256 in "
                          + ", ".join(map(str, dict.fromkeys(dirs)))]
        files[key] = found
    return files, ["found beside the library (sha256 as in the manifest): "
                   + ", ".join(f"{k} {p}" for k, p in files.items())]


def _from_defaults(manifest, defaults) -> tuple:
    """effgen's default files (build/model/...) for a symbol whose manifest records
    their sha256; else (None, [])."""
    needed = ["model", "preprocessing"] + (["postprocessing"] if manifest.get("postprocessing_sha256")
                                           else [])
    files = {k: Path(defaults[k]) for k in needed
             if defaults.get(k) is not None and _matches(defaults[k], manifest, k)}
    if len(files) < len(needed):
        return None, []
    return files, ["effgen's defaults (sha256 as in the manifest): "
                   + ", ".join(f"{k} {p}" for k, p in files.items())]


def _given_symbol(symbols, manifests, given, symbol):
    """The symbol the files named on the command line belong to: --symbol, the only
    one, or the one whose manifest records the named model's sha256."""
    if given.get("model") is None:
        return None
    if symbol is not None:
        return symbol
    if len(symbols) == 1:
        return symbols[0]
    model = Path(given["model"])
    digest = sha256_of(model) if model.is_file() else None
    owners = [s for s in symbols if digest and manifests[s].get("model_sha256") == digest]
    if len(owners) != 1:
        raise ConfigError(f"{model}: " + ("no" if not owners else "more than one")
                          + f" symbol of the library was built from it; name one with --symbol "
                            f"({', '.join(symbols)})")
    return owners[0]


def _short(value) -> str:
    return value[:16] + "..." if isinstance(value, str) and len(value) > 16 else str(value)


def _parity_rows(data_dir, n, seed=0):
    """Raw feature rows: the validation set's raw_* columns if present, else random
    rows in a plausible range (DOMAIN.md section 7). Returns (rows, where from)."""
    cols = [f"raw_{c}" for c in schema.FEATURES]
    if data_dir is not None and Path(data_dir).exists():
        try:
            frame = FeatherReader(data_dir).as_pandas(columns=cols, max_rows=n)
            return frame.to_numpy(dtype=np.float32), f"{len(frame)} rows of {data_dir}"
        except Exception as err:  # any unreadable data: fall back to random rows, say why
            print(f"  (cannot read {data_dir}: {err}; using random rows)", file=sys.stderr)
    rng = np.random.default_rng(seed)
    x = np.empty((n, 12), dtype=np.float32)
    x[:, 0:2] = rng.normal(0, 0.03, (n, 2))
    x[:, 2] = np.where(rng.random(n) < 0.85, rng.normal(0, 45, n), rng.uniform(-300, 2500, n))
    x[:, 3] = np.clip(rng.normal(3.7, 0.5, n), 2.5, 6)
    x[:, 4:6] = rng.normal(0, 0.1, (n, 2))
    x[:, 6] = rng.uniform(1.5, 6, n)
    x[:, 7] = rng.uniform(-np.pi, np.pi, n)
    species = rng.choice(5, n, p=[0.7, 0.12, 0.08, 0.05, 0.05])
    x[:, 8], x[:, 9], x[:, 10] = species == 3, species == 4, species <= 2
    x[:, 11] = rng.choice([-1, 1], n)
    return x, f"{n} random plausible rows"


def efficiency_parity(library, symbol, manifest, model_path, preprocessing_path, data_dir,
                      n_rows, out) -> dict:
    """The efficiency symbol against TensorFlow on validation (or plausible random) rows."""
    lib = Library(library, symbol)
    rows, origin = _parity_rows(data_dir, n_rows)
    ct = load_preprocessing(preprocessing_path, model_path=model_path)
    dtype = np.float32 if manifest.get("preprocessing_dtype") == "float32" else np.float64
    pre = ct.transform(rows.astype(dtype)).astype(np.float32)
    order = trained_order(model_path)
    if order is not None and order != list(range(len(order))):
        # TensorFlow gets what the model was trained on; the library, the ABI order.
        print(f"WARNING   {model_path} was trained on its features in another order "
              "(history.json): export refuses it", file=out)
        pre = pre[:, order]
    reference = load_model(model_path).predict(pre, batch_size=8192, verbose=0)
    got = lib.batch(rows)
    diff = np.abs(got.astype(np.float64) - reference).max(axis=0)
    names = manifest.get("outputs", schema.OUTPUTS)
    print(f"parity    {origin}: max |C - TensorFlow| per class", file=out)
    for name, d in zip(names, diff):
        print(f"          {name:<12} {d:.3g}", file=out)
    return dict(zip(names, map(float, diff)))


def kind_parity(library, symbol, files, n_rows, out, seed=0) -> dict:
    """A sigmoid or generator symbol: effgen.checks.parity_kinds' checks on n_rows rows
    drawn from its tX (generators: the same noise in C and Keras)."""
    from effgen.checks.parity_kinds import SymbolLibrary, check_symbol
    from effgen.provenance import load_keras_model, load_postprocessing

    model = load_keras_model(files["model"], compile=False)
    ct = load_preprocessing(files["preprocessing"], model_path=files["model"])
    ty = load_postprocessing(files["postprocessing"]) if "postprocessing" in files else None
    report = check_symbol(SymbolLibrary(library, symbol), model, ct, ty, n_rows, seed,
                          per_row_rows=KIND_ROWS_PER_CALL)
    b, tol = report["batch"], report["tolerance"]
    value = (f"max |C - ref| / spread {b['max_over_spread']:.3g}" if report["kind"] == "generator"
             else f"max |C - ref| {b['max_abs']:.3g}")
    print(f"parity    {n_rows} rows drawn from its tX against Keras + scikit-learn: {value} "
          f"(tolerance {', '.join(f'{k} {v:g}' for k, v in tol.items())}): "
          + ("PASSED" if report["passed"] else "FAILED"), file=out)
    if "draws" in report:
        d = report["draws"]
        print(f"          draws: {d['disagreements']} disagreements of {d['n']}", file=out)
    for f in report["failures"]:
        print(f"          FAIL {f}", file=out)
    return report


def describe(library, *, model_path=None, preprocessing_path=None, postprocessing_path=None,
             spec=None, symbol=None, defaults=None, data_dir=None, n_rows=10000, out=None) -> dict:
    """Print the library's exports and, per symbol, its kind, inputs, outputs, n_random,
    hashes, manifest and a short parity check (module docstring). `defaults` are files
    nobody named ({"model": ..., "preprocessing": ...}), used only for a symbol whose
    manifest records their sha256. With one symbol, the result keeps its former keys
    (symbol, manifest, max_abs_diff) besides `symbols`."""
    out = out or sys.stdout
    library = Path(library)
    exported = exported_symbols(library)
    symbols = library_symbols(exported)
    if symbol is not None and symbol not in symbols:
        raise ExportError(f"library {library} has no symbol {symbol!r} (it has {', '.join(symbols)})")
    manifests = {s: read_manifest(library, s) for s in symbols}
    given = {"model": model_path, "preprocessing": preprocessing_path,
             "postprocessing": postprocessing_path}
    given_for = _given_symbol(symbols, manifests, given, symbol)
    entries = {}
    if spec is not None:
        from effgen.codegen.spec import read_spec

        entries = {e["symbol"]: e for e in read_spec(spec)}
    print(f"library   {library.resolve()}", file=out)
    print(f"exports   {' '.join(exported)}", file=out)
    print(f"imports   {' '.join(undefined_symbols(library))}", file=out)
    problems = abi_problems(library, manifests, exported)
    print("abi       " + ("PROBLEM: " + "; ".join(problems) if problems else
                          f"OK: exactly the exports of {len(symbols)} symbol(s) "
                          f"({', '.join(symbols)}), no __*_finite imports"), file=out)
    result = {"library": str(library), "exports": exported, "abi_problems": problems, "symbols": {}}
    for s in symbols:
        m = manifests[s]
        kind = m.get("kind", EFFICIENCY.name)
        print(f"\nsymbol    {s}: {kind} ({m.get('family', 'classifier')}), "
              f"{m.get('signature', 'float *f(float *out, const float *in)').replace('*f(', f'*{s}(', 1)}", file=out)
        print(f"inputs    {len(m.get('inputs', []))}: {', '.join(m.get('inputs', []))}", file=out)
        print(f"outputs   {len(m.get('outputs', []))}: {', '.join(m.get('outputs', []))}", file=out)
        print(f"n_random  {m.get('n_random', 0)}", file=out)
        print("hashes    " + ", ".join(f"{k[:-len('_sha256')]} {_short(m.get(k))}"
                                       for k in (f"{f}_sha256" for f in FILES) if k in m), file=out)
        print("manifest  " + json.dumps(m, indent=2).replace("\n", "\n          "), file=out)
        info = {"kind": kind, "manifest": m, "n_random": int(m.get("n_random", 0))}
        files, notes = locate_files(library, s, m, given=given if s == given_for else None,
                                    spec_entry=entries.get(s))
        if files is None and defaults:
            files, more = _from_defaults(m, defaults)
            notes += more
        for n in notes:
            print(f"files     {n}", file=out)
        info["files"] = {k: str(v) for k, v in (files or {}).items()}
        if files is None:
            print("parity    skipped (model files not found; name them with --model, "
                  "--preprocessing [--postprocessing] and --symbol, or --spec)", file=out)
        elif kind == EFFICIENCY.name:
            info["max_abs_diff"] = efficiency_parity(library, s, m, files["model"],
                                                     files["preprocessing"], data_dir, n_rows, out)
        else:
            info["parity"] = kind_parity(library, s, files, n_rows, out)
        result["symbols"][s] = info
    if len(symbols) == 1:
        s = symbols[0]
        result.update(symbol=s, manifest=manifests[s])
        if "max_abs_diff" in result["symbols"][s]:
            result["max_abs_diff"] = result["symbols"][s]["max_abs_diff"]
    return result


def register(subparsers):
    paths = default_paths()
    p = subparsers.add_parser("describe", help="a built library's symbols, manifests and parity checks",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("library", type=Path, metavar="LIB.so")
    p.add_argument("--model", type=Path, default=None,
                   help=f"trained .keras model (default: {paths['model']}, only for a symbol "
                        "whose manifest records its sha256)")
    p.add_argument("--preprocessing", type=Path, default=None,
                   help="pickled fitted ColumnTransformer tX (default: "
                        f"{paths['preprocessing']}, only if the model's history.json or the "
                        "library's manifest records it)")
    p.add_argument("--postprocessing", type=Path, default=None,
                   help="generators: pickled fitted output transform tY")
    p.add_argument("--symbol", default=None,
                   help="the symbol --model/--preprocessing/--postprocessing belong to "
                        "(default: the only one, or the one built from --model)")
    p.add_argument("--spec", type=Path, default=None,
                   help="the TOML the library was exported from (effgen export --spec): "
                        "each symbol's files")
    p.add_argument("--validation", type=Path, default=paths["validation"],
                   help="data directory whose raw_* columns feed the efficiency parity check")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.symbol is not None:
        check_symbol(args.symbol)
    if not args.library.is_file():
        raise ExportError(f"library {args.library} does not exist (run `make lamarr-lib`)")
    for what, path in (("preprocessing", args.preprocessing), ("postprocessing", args.postprocessing)):
        if path is not None and not path.is_file():
            raise PreprocessingError(f"{path}: {what} file is missing")
    paths = default_paths()
    preprocessing = args.preprocessing
    if preprocessing is None and args.model is not None:
        preprocessing = vouched_default(paths["preprocessing"], args.model)
    describe(args.library, model_path=args.model, preprocessing_path=preprocessing,
             postprocessing_path=args.postprocessing, spec=args.spec, symbol=args.symbol,
             defaults={"model": paths["model"], "preprocessing": paths["preprocessing"]},
             data_dir=args.validation)
    return 0
