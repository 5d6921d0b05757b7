"""`effgen describe LIB.so` (also `effgen export --describe LIB.so`): a built library's
exports, manifest, and a short parity check against TensorFlow."""

import json
import sys
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.codegen.export import load_model
from effgen.codegen.native import Library, check_library, exported_symbols, undefined_symbols
from effgen.config import default_paths
from effgen.data.reader import FeatherReader
from effgen.errors import ExportError, PreprocessingError
from effgen.provenance import load_preprocessing, sha256_of, trained_order, vouched_default


def _library_symbol(exported) -> str:
    names = [s[: -len("_manifest")] for s in exported if s.endswith("_manifest")]
    if len(names) != 1:
        raise ExportError(f"cannot tell the model symbol from the exports {exported}")
    return names[0]


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


def describe(library, *, model_path=None, preprocessing_path=None, data_dir=None, n_rows=10000,
             out=None) -> dict:
    """Print the library's exports, manifest and a short parity check against TensorFlow."""
    out = out or sys.stdout
    library = Path(library)
    exported = exported_symbols(library)
    symbol = _library_symbol(exported)
    lib = Library(library, symbol)
    manifest = lib.manifest()
    print(f"library   {library.resolve()}", file=out)
    print(f"exports   {' '.join(exported)}", file=out)
    print(f"imports   {' '.join(undefined_symbols(library))}", file=out)
    try:
        check_library(library, symbol)
        print("abi       OK: exactly the 4 ABI exports, no __*_finite imports", file=out)
    except RuntimeError as err:
        print(f"abi       PROBLEM: {err}", file=out)
    print("manifest  " + json.dumps(manifest, indent=2).replace("\n", "\n          "), file=out)
    result = {"library": str(library), "symbol": symbol, "exports": exported, "manifest": manifest}
    if not (model_path and preprocessing_path and Path(model_path).is_file()
            and Path(preprocessing_path).is_file()):
        print("parity    skipped (model or preprocessing not found; name them with --model "
              "and --preprocessing)", file=out)
        return result
    if manifest.get("model_sha256") not in (None, sha256_of(model_path)):
        print(f"WARNING   {model_path} is not the model this library was built from", file=out)
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
    result["max_abs_diff"] = dict(zip(names, map(float, diff)))
    return result




def register(subparsers):
    paths = default_paths()
    p = subparsers.add_parser("describe", help="a built library's exports, manifest and a parity check")
    p.add_argument("library", type=Path, metavar="LIB.so")
    p.add_argument("--model", type=Path, default=paths["model"], help="trained .keras model")
    p.add_argument("--preprocessing", type=Path, default=None,
                   help="pickled fitted ColumnTransformer (default: "
                        f"{paths['preprocessing']}, only if the model's history.json records it)")
    p.add_argument("--validation", type=Path, default=paths["validation"],
                   help="data directory whose raw_* columns feed the parity check")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.library.is_file():
        raise ExportError(f"library {args.library} does not exist (run `make lamarr-lib`)")
    preprocessing = args.preprocessing
    if preprocessing is not None and not preprocessing.is_file():
        raise PreprocessingError(f"{preprocessing}: preprocessing file is missing")
    if preprocessing is None:
        preprocessing = vouched_default(default_paths()["preprocessing"], args.model)
    describe(args.library, model_path=args.model, preprocessing_path=preprocessing,
             data_dir=args.validation)
    return 0
