"""`effgen export`: the trained model + fitted preprocessing -> <symbol>.c / <symbol>.h
with the Lamarr ABI; `effgen export --describe LIB.so` inspects a built library."""

import hashlib
import sys
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.abi import check_symbol, render_abi
from effgen.atomic import atomic_outputs

BACKENDS = ("effgen", "scikinc")


class ExportError(RuntimeError):
    """The inputs of an export do not fit together."""


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_provenance(model_path, model_sha256, preprocessing_path, preprocessing_sha256) -> bool:
    """Refuse a preprocessing other than the one the model was trained behind, when the
    training history beside the model (history.json, naming this model's sha256) says
    which; same-width preprocessings would otherwise export silently wrong physics.
    Returns whether the check could be made."""
    import json

    history = Path(model_path).with_name("history.json")
    try:
        recorded = json.loads(history.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get("model_sha256") != model_sha256:
        return False  # no history, or the history of another model
    want = recorded.get("preprocessing_sha256")
    if want is None:
        return False
    got = preprocessing_sha256
    if got != want:
        raise ExportError(
            f"model {model_path} was trained on features made by a preprocessing with sha256 "
            f"{want[:16]}... ({history}), but {preprocessing_path} has sha256 {got[:16]}...: "
            f"export with the tX.pkl the model was trained with, or retrain")
    return True


def _load_model(path):
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    if not Path(path).is_file():
        raise FileNotFoundError(f"Keras model {path} does not exist (run `effgen train`)")
    try:
        return keras.models.load_model(str(path), compile=False)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot load Keras model {path}: {err}") from err


def preprocessing_width(ct) -> int:
    """Number of columns the fitted preprocessing outputs."""
    try:
        return len(ct.get_feature_names_out())
    except (AttributeError, ValueError):
        return int(ct.transform(np.zeros((1, ct.n_features_in_))).shape[1])


def export(model_path, preprocessing_path, output_dir, *, backend="effgen", symbol="efficiency",
           sklearn_dtype="float64", tanh="fast") -> dict:
    """Write <output_dir>/<symbol>.c and .h (atomically); return their paths."""
    from effgen.preprocessing_ir import load_preprocessing

    check_symbol(symbol)
    if backend not in BACKENDS:
        raise ExportError(f"backend {backend!r}: expected one of {BACKENDS}")
    model_path, preprocessing_path = Path(model_path), Path(preprocessing_path)
    if not preprocessing_path.is_file():
        raise FileNotFoundError(f"preprocessing {preprocessing_path} does not exist (run `effgen preprocess`)")
    ct = load_preprocessing(preprocessing_path)
    model = _load_model(model_path)
    hashes = {"model_sha256": sha256_of(model_path),
              "preprocessing_sha256": sha256_of(preprocessing_path)}
    provenance_checked = check_provenance(model_path, hashes["model_sha256"], preprocessing_path,
                                          hashes["preprocessing_sha256"])
    n_model = int(model.inputs[0].shape[-1])
    n_pre = preprocessing_width(ct)
    if n_model != n_pre:
        raise ExportError(f"model {model_path} takes {n_model} inputs but preprocessing "
                          f"{preprocessing_path} outputs {n_pre} columns")
    n_raw = int(getattr(ct, "n_features_in_", -1))
    if n_raw != len(schema.FEATURES):
        raise ExportError(f"preprocessing {preprocessing_path} takes {n_raw} raw features; the "
                          f"efficiency ABI takes {len(schema.FEATURES)} ({', '.join(schema.FEATURES)})")
    from effgen.graph import UnsupportedModelError, read_chain

    try:  # for every backend: the scikinc one would not notice a wrong output count
        chain = read_chain(model, n_outputs=len(schema.OUTPUTS))
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{model_path}: {err}") from err
    manifest = {**hashes, "model_file": model_path.name,
                "trained_with_this_preprocessing": "checked" if provenance_checked else "unknown"}

    if backend == "effgen":
        from effgen.codegen import generate
        from effgen.preprocessing_ir import read_preprocessing

        source, header = generate(chain, read_preprocessing(ct, sklearn_dtype),
                                  symbol=symbol, manifest=manifest, tanh=tanh)
    else:
        try:
            from effgen.scikinc_backend import generate_core
        except ImportError as err:
            raise ExportError(f"the scikinc backend is not available ({err})") from err
        core, core_fn = generate_core(model, ct, symbol=symbol)
        manifest["backend"] = "scikinc"
        source, header = render_abi(core, core_fn, symbol=symbol, n_inputs=n_raw,
                                    input_names=schema.FEATURES, output_names=schema.OUTPUTS,
                                    manifest=manifest)
    out = Path(output_dir)
    paths = {"source": out / f"{symbol}.c", "header": out / f"{symbol}.h"}
    with atomic_outputs() as staged:  # both renamed together: never a .h of another .c
        for key, text in (("header", header), ("source", source)):
            with staged.file(paths[key], "w") as f:
                f.write(text)
    return paths


# ---- describe ---------------------------------------------------------------------------

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
            from effgen.reader import FeatherReader

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
    import json

    from effgen.compile import Library, check_library, exported_symbols, undefined_symbols

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
        print("parity    skipped (model or preprocessing not found)", file=out)
        return result
    from effgen.preprocessing_ir import load_preprocessing

    if manifest.get("model_sha256") not in (None, sha256_of(model_path)):
        print(f"WARNING   {model_path} is not the model this library was built from", file=out)
    rows, origin = _parity_rows(data_dir, n_rows)
    ct = load_preprocessing(preprocessing_path)
    dtype = np.float32 if manifest.get("preprocessing_dtype") == "float32" else np.float64
    pre = ct.transform(rows.astype(dtype)).astype(np.float32)
    reference = _load_model(model_path).predict(pre, batch_size=8192, verbose=0)
    got = lib.batch(rows)
    diff = np.abs(got.astype(np.float64) - reference).max(axis=0)
    names = manifest.get("outputs", schema.OUTPUTS)
    print(f"parity    {origin}: max |C - TensorFlow| per class", file=out)
    for name, d in zip(names, diff):
        print(f"          {name:<12} {d:.3g}", file=out)
    result["max_abs_diff"] = dict(zip(names, map(float, diff)))
    return result


# ---- CLI ----------------------------------------------------------------------------------

def register(subparsers):
    from effgen.config import default_paths

    paths = default_paths()
    p = subparsers.add_parser("export", help="generate the C library source (or --describe a built one)")
    p.add_argument("--model", type=Path, default=paths["model"], help="trained .keras model")
    p.add_argument("--preprocessing", type=Path, default=paths["preprocessing"],
                   help="pickled fitted ColumnTransformer")
    p.add_argument("--output-dir", type=Path, default=paths["lamarr"])
    p.add_argument("--backend", choices=BACKENDS, default="effgen")
    p.add_argument("--symbol", default="efficiency", help="exported function name")
    p.add_argument("--sklearn-dtype", choices=("float64", "float32"), default="float64",
                   help="dtype the preprocessing was applied to when training (effgen preprocess: float64)")
    p.add_argument("--tanh", choices=("fast", "libm"), default="fast",
                   help="effgen backend: vectorised rational tanh (|err| <= 4e-7) or libm tanhf")
    p.add_argument("--describe", type=Path, metavar="LIB.so",
                   help="print a built library's exports, manifest and a parity check, then exit")
    p.add_argument("--validation", type=Path, default=paths["validation"],
                   help="data directory whose raw_* columns feed the --describe parity check")
    p.set_defaults(func=run)


def run(args) -> int:
    from effgen.graph import UnsupportedModelError
    from effgen.preprocessing_ir import UnsupportedPreprocessingError

    try:
        return _run(args)
    except (ExportError, FileNotFoundError, UnsupportedModelError,
            UnsupportedPreprocessingError) as err:
        print(f"effgen export: {err}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.describe:
        describe(args.describe, model_path=args.model, preprocessing_path=args.preprocessing,
                 data_dir=args.validation)
        return 0
    paths = export(args.model, args.preprocessing, args.output_dir, backend=args.backend,
                   symbol=args.symbol, sklearn_dtype=args.sklearn_dtype, tanh=args.tanh)
    for p in paths.values():
        print(p)
    return 0
