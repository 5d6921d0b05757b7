"""A wheel carries what effgen needs at run time outside its Python files: the C
templates and the C harness, kept at the repository root in a checkout."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy of the tracked files: setuptools writes build/ into the source
    # tree, which is also make's default work directory.
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)],
                   check=True, capture_output=True, cwd=out)
    (path,) = out.glob("effgen-*.whl")
    return path


def test_wheel_ships_every_template_and_harness_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("templates", "c_harness"):
        files = sorted(p.relative_to(REPO / folder).as_posix()
                       for p in (REPO / folder).rglob("*") if p.is_file())
        assert files, folder
        missing = [f for f in files if f"effgen/{folder}/{f}" not in names]
        assert missing == [], (folder, missing)


def test_installed_package_exports_without_the_checkout(wheel, tmp_path):
    import pickle

    from support import fit_preprocessing, seed_like_model

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    seed_like_model(width=8, blocks=1, seed=0).save(tmp_path / "model.keras")
    with open(tmp_path / "tX.pkl", "wb") as f:
        pickle.dump(fit_preprocessing(n=2000, seed=0, n_quantiles=50), f)
    env = {**os.environ, "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "3"}

    def run(*args):
        res = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    where = run("-c", "import effgen.codegen.abi, effgen.checks.parity_build as p; "
                      "print(effgen.codegen.abi.templates_dir()); print(p.HARNESS_DIR)").split()
    assert [Path(w) for w in where] == [site / "effgen" / "templates", site / "effgen" / "c_harness"]
    run("-m", "effgen", "export", "--model", "model.keras", "--preprocessing", "tX.pkl",
        "--output-dir", "out")
    assert "efficiency" in (tmp_path / "out" / "efficiency.c").read_text()
