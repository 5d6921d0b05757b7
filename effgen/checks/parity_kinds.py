"""`effgen parity --spec`: every symbol of a spec's library (effgen export --spec
--compile) against Keras + scikit-learn run here on the same rows, whatever its kind.

Rows. Raw features drawn from each symbol's own tX: a QuantileTransformer column at
uniform quantiles of its fitted distribution (so the whole fitted range, tails
included, is covered), a passthrough column 0 or 1 (the flags of DOMAIN.md section 8).
Generators get the same N(0, 1) float32 noise in C and in Keras.

Reference. tX.transform on float64 rows, the network in Keras on float32 (features,
noise), and for a generator tY.inverse_transform in float64 of Keras' float32 output.

Checks, per symbol, through SYMBOL (one call per row, as SQLamarr calls it) and
SYMBOL_batch, with these stated tolerances (TOLERANCES):
  efficiency  |C - ref| <= 1e-5 per class; outputs Lamarr would reject; the track-type
              draw with identical uniforms (random_category(p0, 0, 0, p1, p2)).
  sigmoid     |C - ref| <= 1e-5; output in [0, 1]; SYMBOL_draw with identical
              uniforms against random_category(1 - acc, acc) on the reference (a
              disagreement must lie within the tolerance of the boundary 1 - acc); the
              accepted fraction against the mean reference probability (|z| < 5).
  generator   outputs in physical units, |C - ref| <= 1e-3 x the spread of that
              target (its standard deviation over the rows; 1 if constant), no NaN.
              The float32 network differs from Keras by ~1e-6 in the normal space;
              tY's inverse (a QuantileTransformer's interpolation) stretches that by
              its local slope, largest in the sparse tails of the fitted quantiles.
              Measured on the random-weight production stand-ins
              (effgen.checks.production_models), 100k rows: worst 6.0e-5 (resolution,
              QuantileTransformer tY), 4.1e-6 (covariance, StandardScaler ->
              DecorrTransformer -> QuantileTransformer tY).
"""

import json
from pathlib import Path

import numpy as np

from effgen.checks.random_category import lamarr_safety, python_track_type
from effgen.errors import ParityError

TOLERANCES = {
    "efficiency": {"absolute": 1e-5},
    "sigmoid": {"absolute": 1e-5},
    "generator": {"relative_to_spread": 1e-3},
}
MAX_Z = 5.0  # accepted fraction vs mean probability, in binomial standard deviations


# ---- rows ------------------------------------------------------------------------------
def rows_for(ct, n, seed) -> np.ndarray:
    """n raw rows (float32) a fitted tX accepts: quantile columns at uniform quantiles of
    their fitted distribution, passthrough columns 0 or 1."""
    from effgen.codegen.preprocessing_ir import read_preprocessing

    ir = read_preprocessing(ct)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, size=(n, ir.n_inputs)).astype(np.float32)
    for o in ir.outputs:
        if o.kind == "quantile":
            u = rng.random(n)
            x[:, o.input_index] = np.interp(u, o.quantile.references, o.quantile.quantiles)
    return x


# ---- the library, through ctypes ---------------------------------------------------------
class SymbolLibrary:
    """One symbol of a built library, called as SQLamarr calls it (signature from its
    manifest): row by row, in batch, and the kind's draw."""

    def __init__(self, so_path, symbol):
        import ctypes

        self._lib = ctypes.CDLL(str(Path(so_path).resolve()))
        self.symbol = symbol
        manifest = getattr(self._lib, symbol + "_manifest")
        manifest.restype = ctypes.c_char_p
        self.manifest = json.loads(manifest().decode("ascii"))
        self.kind = self.manifest["kind"]
        self.n_in, self.n_out = len(self.manifest["inputs"]), len(self.manifest["outputs"])
        self.n_random = int(self.manifest.get("n_random", 0))
        f = ctypes.POINTER(ctypes.c_float)
        self._f = f
        extra = [f] if self.n_random else []
        self._row = getattr(self._lib, symbol)
        self._row.argtypes, self._row.restype = [f, f] + extra, f
        self._batch = getattr(self._lib, symbol + "_batch")
        self._batch.argtypes, self._batch.restype = [f, f] + extra + [ctypes.c_long], None
        draw = {"efficiency": "_track_type", "sigmoid": "_draw"}.get(self.kind)
        self._draw = getattr(self._lib, symbol + draw) if draw else None
        if self._draw is not None:
            self._draw.argtypes, self._draw.restype = [f, ctypes.c_float], ctypes.c_int

    def _p(self, a):
        return a.ctypes.data_as(self._f)

    def _args(self, x, rnd):
        x = np.ascontiguousarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ParityError(f"{self.symbol}: rows of {self.n_in} inputs expected, got {x.shape}")
        if self.n_random:
            rnd = np.ascontiguousarray(rnd, np.float32)
            if rnd.shape != (len(x), self.n_random):
                raise ParityError(f"{self.symbol}: noise of shape {(len(x), self.n_random)} "
                                  f"expected, got {rnd.shape}")
        return x, rnd

    def per_row(self, x, rnd=None):
        x, rnd = self._args(x, rnd)
        out = np.empty((len(x), self.n_out), np.float32)
        for i in range(len(x)):
            args = [self._p(out[i]), self._p(x[i])] + ([self._p(rnd[i])] if self.n_random else [])
            if self._row(*args) is None:
                raise ParityError(f"{self.symbol}: did not return its out pointer (row {i})")
        return out

    def batch(self, x, rnd=None):
        x, rnd = self._args(x, rnd)
        out = np.empty((len(x), self.n_out), np.float32)
        args = [self._p(out), self._p(x)] + ([self._p(rnd)] if self.n_random else [])
        self._batch(*args, len(x))
        return out

    def draw(self, x, r):
        """The kind's draw (efficiency: SYMBOL_track_type; sigmoid: SYMBOL_draw) per row."""
        x = np.ascontiguousarray(x, np.float32)
        r = np.asarray(r, np.float32)
        return np.array([self._draw(self._p(x[i]), float(r[i])) for i in range(len(x))], np.int64)


# ---- the reference -------------------------------------------------------------------------
def keras_reference(model, ct, ty, raw, rnd=None, batch_size=65536) -> np.ndarray:
    """Keras + scikit-learn on the same rows (and noise): physical outputs, float64."""
    pre = ct.transform(np.asarray(raw, np.float64)).astype(np.float32)
    if rnd is not None:
        from effgen.codegen.graph import features_and_noise

        features, _ = features_and_noise(model, pre.shape[1])
        inputs = [pre, rnd] if features is model.inputs[0] else [rnd, pre]
    else:
        inputs = pre
    y = model.predict(inputs, batch_size=batch_size, verbose=0)
    y = np.asarray(y, np.float32).astype(np.float64)
    return ty.inverse_transform(y) if ty is not None else y


def python_category(args, r) -> np.ndarray:
    """SQLamarr's random_category(a0, a1, ...) on rows of args (n x k): float32 running
    sums in argument order, first index with r < sum, k if none."""
    args = np.asarray(args, np.float32)
    r = np.asarray(r, np.float32)
    result = np.full(len(args), args.shape[1], np.int64)
    undecided = np.ones(len(args), bool)
    s = np.zeros(len(args), np.float32)
    for k in range(args.shape[1]):
        s = (s + args[:, k]).astype(np.float32)
        hit = undecided & (r < s)
        result[hit] = k
        undecided &= ~hit
    return result


def acceptance_args(p) -> np.ndarray:
    """(1 - acc, acc) per row, as SQLamarr's query passes them (float32)."""
    p = np.asarray(p, np.float32).reshape(-1)
    return np.stack([(np.float32(1) - p).astype(np.float32), p], axis=1)


# ---- comparisons --------------------------------------------------------------------------
def compare(kind, c, ref, names) -> dict:
    """Per-output max |C - ref| (generators: also over the target's spread) against the
    kind's tolerance; returns stats and failures."""
    c64 = np.asarray(c, np.float64)
    d = np.abs(c64 - ref)
    nan_rows = int((~np.isfinite(c64)).any(axis=1).sum())
    out = {"nan_rows": nan_rows, "per_output": {}, "failures": []}
    if kind == "generator":
        spread = ref.std(axis=0)
        spread = np.where(spread > 0, spread, 1.0)
        rel = d / spread
        tol = TOLERANCES[kind]["relative_to_spread"]
        for k, name in enumerate(names):
            out["per_output"][name] = {"max_abs": float(np.nanmax(d[:, k])), "spread": float(spread[k]),
                                       "max_over_spread": float(np.nanmax(rel[:, k])),
                                       "mean_over_spread": float(np.nanmean(rel[:, k]))}
        worst = float(np.nanmax(rel)) if rel.size else 0.0
        out["max_over_spread"] = worst
        if nan_rows or worst > tol:
            out["failures"].append(f"max |C - ref| / spread = {worst:.3g} (tolerance {tol:g}, "
                                   f"NaN rows {nan_rows})")
    else:
        tol = TOLERANCES[kind]["absolute"]
        for k, name in enumerate(names):
            out["per_output"][name] = {"max_abs": float(np.nanmax(d[:, k])),
                                       "mean_abs": float(np.nanmean(d[:, k]))}
        worst = float(np.nanmax(d)) if d.size else 0.0
        out["max_abs"] = worst
        if nan_rows or worst > tol:
            out["failures"].append(f"max |C - ref| = {worst:.3g} (tolerance {tol:g}, NaN rows {nan_rows})")
    return out


def check_sigmoid_draws(lib, raw, c, ref, uniforms) -> dict:
    """SYMBOL_draw with identical uniforms against random_category(1 - acc, acc)."""
    tol = TOLERANCES["sigmoid"]["absolute"]
    c_draw = lib.draw(raw, uniforms)
    ref_draw = python_category(acceptance_args(ref), uniforms)
    own = python_category(acceptance_args(c), uniforms)
    boundary = (np.float32(1) - np.asarray(ref, np.float32).reshape(-1)).astype(np.float64)
    near = np.abs(uniforms.astype(np.float64) - boundary) <= tol
    diff = c_draw != ref_draw
    args = acceptance_args(c)
    sums = (args[:, 0] + args[:, 1]).astype(np.float32)
    accepted = float((c_draw == 1).mean())
    expected = float(np.mean(ref))
    sd = float(np.sqrt(max(np.sum(ref * (1 - ref)), 1e-12))) / len(ref)
    z = (accepted - expected) / sd if sd > 0 else 0.0
    res = {"n": int(len(uniforms)), "disagreements": int(diff.sum()),
           "unexplained": int((diff & ~near).sum()), "self_disagreements": int((c_draw != own).sum()),
           "sum_above_one": int((sums > 1).sum()), "accepted_fraction": accepted,
           "mean_probability": expected, "z": float(z), "failures": []}
    if res["unexplained"]:
        res["failures"].append(f"{res['unexplained']} draws disagree with random_category(1 - acc, "
                               f"acc) on the reference away from the boundary")
    if res["self_disagreements"]:
        res["failures"].append(f"SYMBOL_draw disagrees with random_category on the library's own "
                               f"outputs in {res['self_disagreements']} rows")
    if res["sum_above_one"]:
        res["failures"].append(f"(1 - acc) + acc above 1 in {res['sum_above_one']} rows (Lamarr aborts)")
    if abs(z) > MAX_Z:
        res["failures"].append(f"accepted fraction {accepted:.5f} vs mean probability "
                               f"{expected:.5f}: z = {z:.1f}")
    return res


def check_efficiency_draws(lib, raw, c, ref, uniforms) -> dict:
    tol = TOLERANCES["efficiency"]["absolute"]
    c_draw = lib.draw(raw, uniforms)
    ref_draw = python_track_type(ref, uniforms)
    own = python_track_type(c, uniforms)
    from effgen.checks.random_category import cumulative_boundaries

    bounds = cumulative_boundaries(ref).astype(np.float64)
    near = (np.abs(uniforms.astype(np.float64)[:, None] - bounds) <= tol * np.array([1, 2, 3])).any(axis=1)
    diff = c_draw != ref_draw
    safety = lamarr_safety(c)
    res = {"n": int(len(uniforms)), "disagreements": int(diff.sum()),
           "unexplained": int((diff & ~near).sum()), "self_disagreements": int((c_draw != own).sum()),
           "lamarr_safety": safety, "failures": []}
    if res["unexplained"] or res["self_disagreements"]:
        res["failures"].append(f"track-type draws: {res['unexplained']} unexplained, "
                               f"{res['self_disagreements']} against its own outputs")
    bad = sum(safety[k] for k in ("nan_values", "negative_values", "above_one_values",
                                  "lamarr_sum_above_one"))
    if bad:
        res["failures"].append(f"outputs Lamarr would reject: {safety}")
    return res


def check_symbol(lib, model, ct, ty, rows, seed, per_row_rows=None) -> dict:
    """Every check of one symbol on `rows` drawn rows (the one-call-per-row path on the
    first `per_row_rows` of them: ctypes calls cost ~1 us each)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    raw = rows_for(ct, rows, seed)
    rnd = rng.standard_normal((rows, lib.n_random), dtype=np.float32) if lib.n_random else None
    ref = keras_reference(model, ct, ty, raw, rnd)
    batch = lib.batch(raw, rnd)
    m = rows if per_row_rows is None else min(rows, per_row_rows)
    per_row = lib.per_row(raw[:m], None if rnd is None else rnd[:m])
    names = lib.manifest["outputs"]
    report = {"kind": lib.kind, "rows": rows, "per_row_rows": m, "n_random": lib.n_random,
              "tolerance": TOLERANCES[lib.kind], "batch": compare(lib.kind, batch, ref, names),
              "per_row": compare(lib.kind, per_row, ref[:m], names),
              "row_equals_batch_bitwise": bool(np.array_equal(per_row, batch[:m], equal_nan=True))}
    failures = [f"batch: {f}" for f in report["batch"]["failures"]]
    failures += [f"per row: {f}" for f in report["per_row"]["failures"]]
    if not report["row_equals_batch_bitwise"]:
        failures.append("SYMBOL and SYMBOL_batch differ")
    uniforms = rng.random(m, dtype=np.float32)
    if lib.kind == "sigmoid":
        report["draws"] = check_sigmoid_draws(lib, raw[:m], per_row, ref[:m], uniforms)
        failures += report["draws"]["failures"]
    elif lib.kind == "efficiency":
        report["draws"] = check_efficiency_draws(lib, raw[:m], per_row, ref[:m], uniforms)
        failures += report["draws"]["failures"]
    report["failures"] = [f"{lib.symbol}: {f}" for f in failures]
    report["passed"] = not failures
    return report


def run_spec_parity(spec_path, library, *, rows=100_000, per_row_rows=None, seed=12345,
                    output_dir=None) -> dict:
    """Check every symbol of `spec_path` in the built `library`; report['passed'] is
    the verdict. With output_dir, report.json is written there."""
    from effgen.codegen.export import load_postprocessing
    from effgen.codegen.spec import read_spec
    from effgen.provenance import load_keras_model, load_preprocessing, sha256_of

    library = Path(library)
    if not library.is_file():
        raise ParityError(f"library {library} does not exist (effgen export --spec ... --compile)")
    report = {"spec": str(spec_path), "library": str(library), "rows": rows, "seed": seed,
              "symbols": {}, "failures": []}
    for i, e in enumerate(read_spec(spec_path)):
        symbol = e["symbol"]
        try:
            lib = SymbolLibrary(library, symbol)
        except AttributeError as err:
            raise ParityError(f"{library}: no symbol {symbol!r} ({err})") from None
        hashes = {"model_sha256": sha256_of(e["model"]),
                  "preprocessing_sha256": sha256_of(e["preprocessing"])}
        if "postprocessing" in e:
            hashes["postprocessing_sha256"] = sha256_of(e["postprocessing"])
        stale = [k for k, v in hashes.items() if lib.manifest.get(k) != v]
        model = load_keras_model(e["model"])
        ct = load_preprocessing(e["preprocessing"])
        ty = load_postprocessing(e["postprocessing"]) if "postprocessing" in e else None
        res = check_symbol(lib, model, ct, ty, rows, seed + i, per_row_rows)
        if stale:
            res["failures"].append(f"{symbol}: the library's manifest does not match {stale} of "
                                   f"the spec's files (stale library?)")
            res["passed"] = False
        report["symbols"][symbol] = res
        report["failures"] += res["failures"]
    report["passed"] = not report["failures"]
    if output_dir is not None:
        from effgen.atomic import atomic_file

        with atomic_file(Path(output_dir) / "report.json", "w") as f:
            json.dump(report, f, indent=2)
    return report


def summary(report) -> str:
    lines = [f"parity of {report['library']} ({report['rows']} rows a symbol): "
             + ("PASSED" if report["passed"] else "FAILED")]
    for symbol, r in report["symbols"].items():
        b = r["batch"]
        value = (f"max |C - ref| / spread {b['max_over_spread']:.3g}" if r["kind"] == "generator"
                 else f"max |C - ref| {b['max_abs']:.3g}")
        tol = ", ".join(f"{k} {v:g}" for k, v in r["tolerance"].items())
        lines.append(f"  {symbol:12s} {r['kind']:10s} {value} (tolerance: {tol})"
                     + (f"; draws: {r['draws']['disagreements']} disagreements of {r['draws']['n']}"
                        if "draws" in r else ""))
    lines += [f"  FAIL {f}" for f in report["failures"]]
    return "\n".join(lines)
