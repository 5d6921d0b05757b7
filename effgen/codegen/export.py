"""`effgen export`: the trained model + fitted preprocessing -> <symbol>.c / <symbol>.h
with the Lamarr ABI; `effgen export --describe LIB.so` inspects a built library."""

from pathlib import Path

from effgen import schema
from effgen.atomic import atomic_outputs
from effgen.codegen.abi import check_symbol, render_abi
from effgen.errors import ExportError  # noqa: F401 (re-exported)
from effgen.provenance import (
    check_contract,
    check_provenance,
    load_keras_model,
    load_preprocessing,
    preprocessing_width,
    recorded_history,
    sha256_of,
)

BACKENDS = ("effgen", "scikinc")








def load_model(path):
    return load_keras_model(path, compile=False)




def export(model_path, preprocessing_path, output_dir, *, backend="effgen", symbol="efficiency",
           sklearn_dtype="float64", tanh="fast") -> dict:
    """Write <output_dir>/<symbol>.c and .h (atomically); return their paths."""
    check_symbol(symbol)
    if backend not in BACKENDS:
        raise ExportError(f"backend {backend!r}: expected one of {BACKENDS}")
    model_path, preprocessing_path = Path(model_path), Path(preprocessing_path)
    if not preprocessing_path.is_file():
        raise FileNotFoundError(f"preprocessing {preprocessing_path} does not exist (run `effgen preprocess`)")
    if not model_path.is_file():
        raise FileNotFoundError(f"Keras model {model_path} does not exist (run `effgen train`)")
    hashes = {"model_sha256": sha256_of(model_path),
              "preprocessing_sha256": sha256_of(preprocessing_path)}
    # Provenance and the trained contract first: nothing is unpickled before they pass.
    provenance_checked = check_provenance(model_path, hashes["model_sha256"], preprocessing_path,
                                          hashes["preprocessing_sha256"])
    check_contract(model_path, recorded_history(model_path, hashes["model_sha256"]))
    ct = load_preprocessing(preprocessing_path)
    model = load_model(model_path)
    n_model = int(model.inputs[0].shape[-1])
    n_pre = preprocessing_width(ct)
    if n_model != n_pre:
        raise ExportError(f"model {model_path} takes {n_model} inputs but preprocessing "
                          f"{preprocessing_path} outputs {n_pre} columns")
    n_raw = int(getattr(ct, "n_features_in_", -1))
    if n_raw != len(schema.FEATURES):
        raise ExportError(f"preprocessing {preprocessing_path} takes {n_raw} raw features; the "
                          f"efficiency ABI takes {len(schema.FEATURES)} ({', '.join(schema.FEATURES)})")
    from effgen.codegen.graph import UnsupportedModelError, read_chain

    try:  # for every backend: the scikinc one would not notice a wrong output count
        chain = read_chain(model, n_outputs=len(schema.OUTPUTS))
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{model_path}: {err}") from err
    manifest = {**hashes, "model_file": model_path.name,
                "trained_with_this_preprocessing": "checked" if provenance_checked else "unknown"}

    if backend == "effgen":
        from effgen.codegen.backends.effgen_c import generate
        from effgen.codegen.preprocessing_ir import read_preprocessing

        source, header = generate(chain, read_preprocessing(ct, sklearn_dtype),
                                  symbol=symbol, manifest=manifest, tanh=tanh)
    else:
        try:
            from effgen.codegen.backends.scikinc import generate_core
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


# ---- CLI ----------------------------------------------------------------------------------

def register(subparsers):
    from effgen.config import add_knob, default_paths

    paths = default_paths()
    p = subparsers.add_parser("export", help="generate the C library source")
    p.add_argument("--model", type=Path, default=paths["model"], help="trained .keras model")
    p.add_argument("--preprocessing", type=Path, default=paths["preprocessing"],
                   help="pickled fitted ColumnTransformer")
    p.add_argument("--output-dir", type=Path, default=paths["lamarr"])
    add_knob(p, "--backend", "BACKEND", choices=BACKENDS)
    add_knob(p, "--symbol", "SYMBOL")
    p.add_argument("--sklearn-dtype", choices=("float64", "float32"), default="float64",
                   help="dtype the preprocessing was applied to when training (effgen preprocess: float64)")
    p.add_argument("--tanh", choices=("fast", "libm"), default="fast",
                   help="effgen backend: vectorised rational tanh (|err| <= 4e-7) or libm tanhf")
    p.set_defaults(func=run)


def run(args) -> int:
    paths = export(args.model, args.preprocessing, args.output_dir, backend=args.backend,
                   symbol=args.symbol, sklearn_dtype=args.sklearn_dtype, tanh=args.tanh)
    for p in paths.values():
        print(p)
    return 0
