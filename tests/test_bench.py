"""Smoke test of `effgen bench` at tiny sizes, so the benchmark cannot rot.

It checks that every row of the table is there with positive finite numbers; it never
checks speed (the machine is shared)."""

import json
import math
import os
import subprocess
import sys

EXPECTED_ROWS = {
    "codegen": ["effgen: export", "scikinc: export", "effgen: compile", "scikinc: compile",
                "effgen: export + compile", "scikinc: export + compile",
                "effgen: .so size", "scikinc: .so size"],
    "calls": ["scikinc C library, per call", "scikinc C library, batched",
              "effgen C library, per call", "effgen C library, batched",
              "TensorFlow predict, network only", "TensorFlow predict, with preprocessing",
              "ONNX Runtime, batched", "ONNX Runtime, batch 1 per call",
              "floor: weights streamed from cache once", "floor: multiply-adds at the FMA peak"],
    "lamarr": ["scikinc library", "effgen library", "echo library (Plugin overhead)"],
    "reader": ["effgen as_tf_dataset().batch", "tf blocks .unbatch().batch",
               "original from_generator per row"],
    "preprocess": ["effgen preprocess (streaming), 20,000 rows",
                   "effgen preprocess, ZLIB-1 tuple, 20,000 rows",
                   "notebook design (all in memory), 20,000 rows",
                   "effgen preprocess (streaming), 20,000 rows: peak RSS",
                   "effgen preprocess, ZLIB-1 tuple, 20,000 rows: peak RSS",
                   "notebook design (all in memory), 20,000 rows: peak RSS"],
    "chain": [f"{b}: {m} per call" for b in ("effgen", "scikinc")
              for m in ("acceptance", "efficiency", "resolution", "covariance")]
    + [f"{b}: chain per reconstructed track" for b in ("effgen", "scikinc")]
    + [f"{b}: tracking.so build" for b in ("effgen", "scikinc")],
}


def test_quick_bench_writes_every_row_with_positive_finite_numbers(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", EFFGEN_WORKDIR=str(tmp_path / "work"))
    proc = subprocess.run(
        [sys.executable, "-m", "effgen", "bench", "--quick", "--synthetic-model", "--repeats", "2",
         "--output-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for section in EXPECTED_ROWS:
        assert f"[bench] {section}" in proc.stdout  # a progress line per section

    report = json.loads((out / "bench.json").read_text())
    assert report["failures"] == {}
    assert "RANDOM weights" in report["meta"]["model"]
    assert report["meta"]["pinned_cpu"] in report["meta"]["allowed_cpus"]
    assert set(report["sections"]) == set(EXPECTED_ROWS)
    markdown = (out / "bench.md").read_text()
    for section, names in EXPECTED_ROWS.items():
        rows = {r["name"]: r for r in report["sections"][section]}
        assert sorted(rows) == sorted(names), section
        for name, r in rows.items():
            values = [r["median"], r["min"], r["max"], r["q1"], r["q3"], r["ratio"], *r["runs"]]
            assert all(math.isfinite(v) and v > 0 for v in values), (section, name, r)
            assert r["min"] <= r["median"] <= r["max"]
            if section in ("calls", "lamarr", "reader") or (section == "chain" and "build" not in name):
                assert len(r["runs"]) == 2, (section, name)
            assert f"| {name} |" in markdown
    # each section's baseline row is its own reference
    assert {r["name"]: r["ratio"] for r in report["sections"]["calls"]}["scikinc C library, per call"] == 1
    ratios = {r["name"]: r["ratio"] for r in report["sections"]["preprocess"]}
    assert ratios["notebook design (all in memory), 20,000 rows"] == 1
    assert ratios["notebook design (all in memory), 20,000 rows: peak RSS"] == 1
    assert "bench.md" in proc.stdout and "| effgen C library, per call |" in proc.stdout
    # the effgen rows against their floors (measured in the same run), scikinC and ONNX Runtime
    calls = {r["name"]: r for r in report["sections"]["calls"]}
    for mode, floor in (("per call", "floor: weights streamed from cache once"),
                        ("batched", "floor: multiply-adds at the FMA peak")):
        vs = calls[f"effgen C library, {mode}"]["vs"]
        assert sorted(vs) == ["floor", "onnxruntime", "scikinc"]
        assert math.isclose(vs["floor"], calls[f"effgen C library, {mode}"]["median"] / calls[floor]["median"])
        assert f"| effgen C library, {mode} | {vs['floor']:.2f} |" in markdown
    # every C timing (libraries and floors alike) is the fastest of short windows per repeat,
    # with the mean over those windows kept beside it; the other baselines are single runs
    for name, r in calls.items():
        if "C library" in name or name.startswith("floor: "):
            assert r["windows"] == report["meta"]["sizes"]["windows"] > 1, name
            assert len(r["window_means"]) == len(r["runs"]), name
            assert all(best <= mean * (1 + 1e-6) for best, mean in zip(r["runs"], r["window_means"])), name
        else:
            assert "windows" not in r and "window_means" not in r, name
    assert "fastest of" in markdown


def test_chain_spec_names_model_files_that_resolve_from_a_relative_work_dir(tmp_path, monkeypatch):
    """`effgen bench --output-dir build/bench` (relative): the spec's paths must not be
    read relative to the spec's own folder a second time."""
    from pathlib import Path

    import tomllib

    from effgen.bench.latency import chain_spec

    monkeypatch.chdir(tmp_path)
    models = Path("work/models/resolution")
    models.mkdir(parents=True)
    for name in ("model.keras", "tX.pkl", "tY.pkl"):
        (models / name).write_bytes(b"")
    spec = chain_spec({"resolution": models}, Path("work/tracking.toml"))
    entry = tomllib.loads(spec.read_text())["model"][0]
    for key in ("model", "preprocessing", "postprocessing"):
        assert (spec.parent / entry[key]).resolve() == (models / Path(entry[key]).name).resolve()
