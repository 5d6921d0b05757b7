"""`effgen export`: a trained model + fitted preprocessing tX (+ output transform tY for
a generator) -> <symbol>.c / <symbol>.h / <symbol>.json with the Lamarr ABI of the
model's kind (read from the model: effgen.codegen.kinds); `--spec FILE.toml` exports
several symbols into one directory (and `--compile`s them into one library, see
effgen.codegen.spec). `effgen export --describe LIB.so` inspects a built library."""

import json
from dataclasses import dataclass
from pathlib import Path

from effgen import schema
from effgen.atomic import atomic_outputs
from effgen.codegen import backends
from effgen.codegen.abi import library_manifest, render_abi
from effgen.codegen.kinds import EFFICIENCY, SIGMOID, ModelKind, io_names, kind_of
from effgen.codegen.symbols import check_symbol
from effgen.errors import (
    ExportError,  # noqa: F401 (re-exported)
    InputFileError,
)
from effgen.provenance import (
    check_contract,
    check_provenance,
    load_keras_model,
    load_postprocessing,
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


def check_sigmoid_contract(model_path, recorded, kind) -> bool:
    """The efficiency's contract check for a sigmoid (acceptance) model: its training
    record (history.json, as `effgen train --target acceptance` writes it: `features`,
    `labels`) must list the features in the order of the ABI's inputs and one label.
    Inputs named in0, in1, ... (a tX fitted on arrays, a symbol effgen has no names
    for) are effgen's tX's columns when there are 12: schema.FEATURES. Returns whether
    a record let the check be made."""
    if not recorded:
        return False
    inputs = list(kind.inputs)
    if inputs == [f"in{i}" for i in range(len(inputs))] and len(inputs) == len(schema.FEATURES):
        inputs = list(schema.FEATURES)
    labels = list(recorded.get("labels") or ())
    # One output: its name is the symbol's; only a record of another count is wrong.
    return check_contract(model_path, recorded, features=inputs,
                          labels=labels if len(labels) == kind.n_outputs else list(kind.outputs))


@dataclass
class Prepared:
    """One symbol ready to write: the backend's core, its kind (named) and manifest."""
    symbol: str
    kind: ModelKind
    core: backends.Core
    manifest: dict


def prepare(model_path, preprocessing_path, *, postprocessing_path=None, backend="effgen",
            symbol="efficiency", sklearn_dtype="float64", tanh="fast", n_random=None,
            kind=None) -> Prepared:
    """Check, load and generate one symbol; nothing is written. The kind is read from
    the model (a two-input generator, a Dense(1, sigmoid) classifier, the 4-class
    softmax efficiency); `kind` given must agree. `n_random`, if given, must be the
    model's noise width. Cheap checks (files, symbol, hashes, provenance) come first."""
    check_symbol(symbol)
    try:
        plugin = backends.get(backend)
    except ValueError as err:
        raise ExportError(str(err)) from err
    model_path, preprocessing_path = Path(model_path), Path(preprocessing_path)
    if not preprocessing_path.is_file():
        raise FileNotFoundError(f"preprocessing {preprocessing_path} does not exist (run `effgen preprocess`)")
    if not model_path.is_file():
        raise FileNotFoundError(f"Keras model {model_path} does not exist (run `effgen train`)")
    if postprocessing_path is not None and not Path(postprocessing_path).is_file():
        raise InputFileError(f"output transform {postprocessing_path} does not exist")
    hashes = {"model_sha256": sha256_of(model_path),
              "preprocessing_sha256": sha256_of(preprocessing_path)}
    # Provenance first: nothing is unpickled before it passes.
    provenance_checked = check_provenance(model_path, hashes["model_sha256"], preprocessing_path,
                                          hashes["preprocessing_sha256"])
    recorded = recorded_history(model_path, hashes["model_sha256"])
    if recorded and len(recorded.get("labels") or ()) == len(schema.LABELS):
        check_contract(model_path, recorded)  # an efficiency training's record: before unpickling
    ct = load_preprocessing(preprocessing_path)
    ty = load_postprocessing(postprocessing_path) if postprocessing_path is not None else None
    model = load_model(model_path)
    n_pre = preprocessing_width(ct)
    from effgen.codegen.graph import UnsupportedModelError, features_and_noise, read_chain

    if len(model.inputs) == 2:
        features, _ = features_and_noise(model, n_pre)
        n_model = int(features.shape[-1])
    else:
        n_model = int(model.inputs[0].shape[-1])
    if n_model != n_pre:
        raise ExportError(f"model {model_path} takes {n_model} inputs but preprocessing "
                          f"{preprocessing_path} outputs {n_pre} columns")
    try:
        chain = read_chain(model, n_features=n_pre)
        found = kind_of(chain, where=f"model {model.name!r}")
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{model_path}: {err}") from err
    if kind is not None and kind.name != found.name:
        raise ExportError(f"{model_path} is a {found.name} model, not the {kind.name} asked for")
    if found.name == EFFICIENCY.name:
        check_contract(model_path, recorded)
    if n_random is not None and int(n_random) != chain.n_random:
        raise ExportError(f"{model_path}: the model's noise input is {chain.n_random} wide, "
                          f"not the n_random = {n_random} given")
    if ty is not None and found.family != "generator":
        raise ExportError(f"{postprocessing_path}: an output transform is for generators; "
                          f"{model_path} is a {found.name} model")
    n_raw = int(getattr(ct, "n_features_in_", -1))
    inputs, outputs = io_names(found, symbol, n_raw, chain.n_outputs, ct, ty)
    kind = found.named(inputs, outputs, chain.n_random)
    if n_raw != kind.n_inputs:
        raise ExportError(f"preprocessing {preprocessing_path} takes {n_raw} raw features; the "
                          f"{kind.name} ABI takes {kind.n_inputs} ({', '.join(kind.inputs)})")
    if kind.name == SIGMOID.name:
        check_sigmoid_contract(model_path, recorded, kind)
    if found.name == EFFICIENCY.name and chain.n_outputs != kind.n_outputs:
        raise UnsupportedModelError(f"{model_path}: the model has {chain.n_outputs} outputs; "
                                    f"{kind.n_outputs} are needed")
    if kind.name not in plugin.kinds:
        raise ExportError(f"backend {backend!r} does not generate {kind.name} models "
                          f"({model_path}; it generates {', '.join(plugin.kinds)})")
    if ty is not None:
        from effgen.codegen.postprocessing_ir import read_postprocessing

        # every step must have an inverse in C and tY's width be the model's outputs
        read_postprocessing(ty, chain.n_outputs, what=f"output transform {postprocessing_path}")
        hashes["postprocessing_sha256"] = sha256_of(postprocessing_path)
    elif kind.family == "generator":
        hashes["postprocessing_sha256"] = None
    # File names (not paths: the manifest is embedded in the library) let `effgen
    # describe` find the files again beside the library; their hashes vouch for them.
    files = {"model_file": model_path.name, "preprocessing_file": preprocessing_path.name}
    if postprocessing_path is not None:
        files["postprocessing_file"] = Path(postprocessing_path).name
    manifest = {**hashes, **files,
                "trained_with_this_preprocessing": "checked" if provenance_checked else "unknown"}
    manifest["backend"] = plugin.name
    core = plugin.generate(backends.Request(
        model=model, chain=chain, preprocessing=ct, symbol=symbol, kind=kind,
        options={"sklearn_dtype": sklearn_dtype, "tanh": tanh}, postprocessing=ty))
    return Prepared(symbol=symbol, kind=kind, core=core, manifest=manifest)


def export(model_path, preprocessing_path, output_dir, *, backend="effgen", symbol="efficiency",
           sklearn_dtype="float64", tanh="fast", kind=None, postprocessing_path=None,
           n_random=None) -> dict:
    """Write <output_dir>/<symbol>.c, .h and .json (atomically); return their paths."""
    p = prepare(model_path, preprocessing_path, postprocessing_path=postprocessing_path,
                backend=backend, symbol=symbol, sklearn_dtype=sklearn_dtype, tanh=tanh,
                n_random=n_random, kind=kind)
    return write_sources(p.core, output_dir, symbol=p.symbol, manifest=p.manifest, kind=p.kind)


def rendered(core: backends.Core, *, symbol, manifest, kind=EFFICIENCY) -> dict:
    """{"source", "header", "manifest"}: the texts of <symbol>.c, .h and .json."""
    source, header = render_abi(core, symbol=symbol, manifest=manifest, kind=kind)
    info = library_manifest(core, symbol=symbol, manifest=manifest, kind=kind)
    return {"header": header, "manifest": json.dumps(info, indent=2) + "\n", "source": source}


def source_paths(output_dir, symbol) -> dict:
    out = Path(output_dir)
    paths = {"source": out / f"{symbol}.c", "header": out / f"{symbol}.h"}
    paths["manifest"] = manifest_path(paths["source"])
    return paths


def write_sources(core: backends.Core, output_dir, *, symbol, manifest, kind=EFFICIENCY) -> dict:
    """Wrap `core` with the ABI layer and write <symbol>.c, .h and .json into
    output_dir, renamed together (never a .h or manifest of another .c)."""
    texts = rendered(core, symbol=symbol, manifest=manifest, kind=kind)
    paths = source_paths(output_dir, symbol)
    with atomic_outputs() as staged:
        for key, text in texts.items():
            with staged.file(paths[key], "w") as f:
                f.write(text)
    return paths


# ---- CLI ----------------------------------------------------------------------------------

def register(subparsers):
    from effgen.config import add_knob, default_paths

    paths = default_paths()
    p = subparsers.add_parser(
        "export", help="generate the C library source",
        description="One model: --model, --preprocessing (tX) [--postprocessing (tY)] "
                    "--symbol; several into one library: --spec FILE.toml [--compile]. "
                    "The kind (efficiency softmax, sigmoid classifier, generator) is read "
                    "from the model.")
    p.add_argument("--model", type=Path, default=None,
                   help=f"trained .keras model (default {paths['model']})")
    p.add_argument("--preprocessing", type=Path, default=None,
                   help=f"pickled fitted ColumnTransformer tX (default {paths['preprocessing']})")
    p.add_argument("--postprocessing", type=Path, default=None,
                   help="generators: pickled fitted output transform tY, inverted in C")
    p.add_argument("--n-random", type=int, default=None,
                   help="generators: the noise width, checked against the model's")
    p.add_argument("--spec", type=Path, default=None,
                   help="TOML file of [[model]] tables (symbol, model, preprocessing, "
                        "postprocessing, n_random), paths relative to it")
    p.add_argument("--compile", action="store_true",
                   help="with --spec: build OUTPUT_DIR/<spec stem>.so with the library's flags")
    p.add_argument("--output-dir", type=Path, default=paths["lamarr"])
    add_knob(p, "--backend", "BACKEND", choices=backends.names())
    add_knob(p, "--symbol", "SYMBOL")
    add_knob(p, "--cc", "CC")
    add_knob(p, "--arch-flags", "ARCH_FLAGS")
    p.add_argument("--sklearn-dtype", choices=("float64", "float32"), default="float64",
                   help="dtype the preprocessing was applied to when training (effgen preprocess: float64)")
    p.add_argument("--tanh", choices=("fast", "libm"), default="fast",
                   help="effgen backend: vectorised rational tanh (|err| <= 4e-7) or libm tanhf")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex

    from effgen.config import ConfigError, default_paths

    if args.spec is not None:
        given = [f for f in ("model", "preprocessing", "postprocessing", "n_random")
                 if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"--spec lists the models; do not also give "
                              f"{', '.join('--' + g.replace('_', '-') for g in given)}")
        from effgen.codegen.spec import export_spec

        arch = args.arch_flags
        arch = shlex.split(arch) if isinstance(arch, str) else list(arch or ())
        result = export_spec(args.spec, args.output_dir, backend=args.backend,
                             compile=args.compile, cc=args.cc, arch_flags=arch,
                             sklearn_dtype=args.sklearn_dtype, tanh=args.tanh)
        for value in result.values():
            for p in (value.values() if isinstance(value, dict) else [value]):
                print(p)
        return 0
    if args.compile:
        raise ConfigError("--compile builds the library of a --spec; for one model use "
                          "`make lamarr-lib` or compile <symbol>.c")
    paths = default_paths()
    paths = export(args.model or paths["model"], args.preprocessing or paths["preprocessing"],
                   args.output_dir, backend=args.backend, symbol=args.symbol,
                   sklearn_dtype=args.sklearn_dtype, tanh=args.tanh,
                   postprocessing_path=args.postprocessing, n_random=args.n_random)
    for p in paths.values():
        print(p)
    return 0
