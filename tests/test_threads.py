"""Many threads calling the compiled library at once give bit-identical results
(c_harness/threads.c; Lamarr calls the model from one thread per DB connection)."""

import os
import pickle
import subprocess

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from support import fit_preprocessing, raw_features, seed_like_model

from effgen.codegen.export import export
from effgen.codegen.native import compile_shared
from effgen.config import shipped_dir

pytestmark = pytest.mark.slow

DRIVER = shipped_dir("c_harness", "threads.c") / "threads.c"


@pytest.mark.parametrize("backend", ["effgen", "scikinc"])
def test_concurrent_calls_are_bit_identical(tmp_path, backend):
    model = seed_like_model(width=32, blocks=2, seed=5)
    model.save(tmp_path / "model.keras")
    with open(tmp_path / "tX.pkl", "wb") as f:
        pickle.dump(fit_preprocessing(n=5000, seed=2, n_quantiles=200), f)
    paths = export(tmp_path / "model.keras", tmp_path / "tX.pkl", tmp_path, backend=backend)
    so = compile_shared(paths["source"], tmp_path / "efficiency.so")

    exe = tmp_path / "threads"
    subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
                    "-o", str(exe), str(DRIVER), "-ldl"], check=True)
    x = raw_features(4000, seed=8).astype(np.float32)
    x[::97, 3] = np.nan  # NaN rows take the fallback path concurrently too
    (tmp_path / "in.f32").write_bytes(np.ascontiguousarray(x).tobytes())
    run = subprocess.run([str(exe), str(so), "efficiency", str(tmp_path / "in.f32"),
                          str(len(x)), "12", "4", "8", "3"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bit-identical" in run.stdout
