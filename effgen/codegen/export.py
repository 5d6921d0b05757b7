"""`effgen export`: the trained model + fitted preprocessing -> <symbol>.c / <symbol>.h
with the Lamarr ABI; `effgen export --describe LIB.so` inspects a built library."""

import json
from pathlib import Path

from effgen.atomic import atomic_outputs
from effgen.codegen import backends
from effgen.codegen.abi import library_manifest, render_abi
from effgen.codegen.kinds import EFFICIENCY
from effgen.codegen.symbols import check_symbol
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


def load_model(path):
    return load_keras_model(path, compile=False)




def manifest_path(source) -> Path:
    """Where export writes the manifest of a generated source (<symbol>.json beside
    <symbol>.c): backend, kind, function names, hashes; what the library's
    SYMBOL_manifest() returns, less the build's isa, cflags and compiler."""
    return Path(source).with_suffix(".json")


def export(model_path, preprocessing_path, output_dir, *, backend="effgen", symbol="efficiency",
           sklearn_dtype="float64", tanh="fast", kind=EFFICIENCY) -> dict:
    """Write <output_dir>/<symbol>.c, .h and .json (atomically); return their paths."""
    check_symbol(symbol)
    try:
        plugin = backends.get(backend)
    except ValueError as err:
        raise ExportError(str(err)) from err
    if kind.name not in plugin.kinds:
        raise ExportError(f"backend {backend!r} does not generate {kind.name} models")
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
    if n_raw != kind.n_inputs:
        raise ExportError(f"preprocessing {preprocessing_path} takes {n_raw} raw features; the "
                          f"{kind.name} ABI takes {kind.n_inputs} ({', '.join(kind.inputs)})")
    from effgen.codegen.graph import UnsupportedModelError, read_chain

    try:  # for every backend: the scikinc one would not notice a wrong output count
        chain = read_chain(model, n_outputs=kind.n_outputs)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{model_path}: {err}") from err
    manifest = {**hashes, "model_file": model_path.name,
                "trained_with_this_preprocessing": "checked" if provenance_checked else "unknown"}

    manifest["backend"] = plugin.name
    core = plugin.generate(backends.Request(
        model=model, chain=chain, preprocessing=ct, symbol=symbol, kind=kind,
        options={"sklearn_dtype": sklearn_dtype, "tanh": tanh}))
    return write_sources(core, output_dir, symbol=symbol, manifest=manifest, kind=kind)


def write_sources(core: backends.Core, output_dir, *, symbol, manifest, kind=EFFICIENCY) -> dict:
    """Wrap `core` with the ABI layer and write <symbol>.c, .h and .json into
    output_dir, renamed together (never a .h or manifest of another .c)."""
    source, header = render_abi(core, symbol=symbol, manifest=manifest, kind=kind)
    info = library_manifest(core, symbol=symbol, manifest=manifest, kind=kind)
    out = Path(output_dir)
    paths = {"source": out / f"{symbol}.c", "header": out / f"{symbol}.h"}
    paths["manifest"] = manifest_path(paths["source"])
    texts = {"header": header, "manifest": json.dumps(info, indent=2) + "\n", "source": source}
    with atomic_outputs() as staged:
        for key, text in texts.items():
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
    add_knob(p, "--backend", "BACKEND", choices=backends.names())
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
