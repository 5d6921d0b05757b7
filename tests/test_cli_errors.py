"""One error policy, for every stage: a missing file, a corrupt file (pickle, .keras,
feather, library), a bad flag or environment value and an unsupported model each give
exactly one `effgen <stage>: ...` line on stderr and exit status 1, before any training
or heavy work starts. Run in-process through effgen.cli.main."""

import pickle

import pytest
from support import build_abi_library, fit_preprocessing, seed_like_model

from effgen import cli, config

STAGES = ["synth", "preprocess", "train", "baseline", "validate", "export", "describe", "parity", "lamarr",
          "bench"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import keras

    d = tmp_path_factory.mktemp("cli_errors")
    seed_like_model(width=8, blocks=1).save(d / "model.keras")
    # Five outputs: the efficiency ABI has four, so no backend can export it.
    inp = keras.layers.Input((12,))
    keras.Model(inp, keras.layers.Dense(5, activation="softmax")(inp)).save(d / "five.keras")
    with open(d / "tX.pkl", "wb") as f:
        pickle.dump(fit_preprocessing(n=3000), f)
    (d / "corrupt.pkl").write_bytes(b"\x80\x05this is not a pickle")
    (d / "corrupt.keras").write_bytes(b"this is not a zip file")
    (d / "corrupt.feather").write_bytes(b"ARROW1 but truncated")
    (d / "corrupt.so").write_bytes(b"\x7fELF not really")
    (d / "a_file").write_text("x")
    lib_dir = d / "lib"
    lib_dir.mkdir()
    build_abi_library(lib_dir, symbol="efficiency")
    return {"dir": d, "model": d / "model.keras", "five": d / "five.keras", "tx": d / "tX.pkl",
            "lib": lib_dir / "libefficiency.so", "header": lib_dir / "efficiency.h",
            "missing": d / "no" / "such.file", **{f"corrupt_{k}": d / f"corrupt.{k}"
                                                  for k in ("pkl", "keras", "feather", "so")}}


def _cases(f, tiny, tmp):
    """(stage, what, argv, environment) for every stage."""
    data = str(tiny["validation"])
    out = str(tmp / "out")
    m, tx, lib = str(f["model"]), str(f["tx"]), str(f["lib"])
    return [
        ("synth", "unwritable output", ["--output", str(f["dir"] / "a_file" / "s.feather")], {}),
        ("synth", "bad flag", ["--n", "1.9", "--output", out], {}),
        ("synth", "bad env", ["--output", out], {"N_PARTICLES": "1.9"}),
        ("preprocess", "missing file", ["--input", str(f["missing"]), "--output-dir", out,
                                        "--preprocessing", out + "/tX.pkl"], {}),
        ("preprocess", "corrupt file", ["--input", str(f["corrupt_feather"]), "--output-dir", out,
                                        "--preprocessing", out + "/tX.pkl"], {}),
        ("preprocess", "bad flag", ["--seed", "x"], {}),
        ("preprocess", "bad env", ["--input", str(f["missing"])], {"SEED": "-1"}),
        ("train", "missing file", ["--train-data", str(f["missing"]), "--validation-data", data,
                                   "--output", out + "/m.keras"], {}),
        ("train", "corrupt file", ["--train-data", str(f["dir"]), "--validation-data", data,
                                   "--output", out + "/m.keras"], {}),
        ("train", "bad flag", ["--width", "0"], {}),
        ("train", "bad env", [], {"BATCH_SIZE": "abc"}),
        ("validate", "missing file", ["--model", str(f["missing"]), "--data", data,
                                      "--output-dir", out], {}),
        ("validate", "corrupt model", ["--model", str(f["corrupt_keras"]), "--data", data,
                                       "--output-dir", out], {}),
        ("validate", "corrupt pickle", ["--model", m, "--preprocessing", str(f["corrupt_pkl"]),
                                        "--data", data, "--output-dir", out], {}),
        ("validate", "bad flag", ["--max-rows", "many"], {}),
        ("validate", "corrupt baseline", ["--model", m, "--data", data, "--output-dir", out,
                                          "--baseline", str(f["corrupt_feather"])], {}),
        ("baseline", "missing file", ["--train-data", str(f["missing"]), "--data", data,
                                      "--output", out + "/b.npz"], {}),
        ("baseline", "bad flag", ["--threads", "0"], {}),
        ("export", "missing file", ["--model", m, "--preprocessing", str(f["missing"]),
                                    "--output-dir", out], {}),
        ("export", "corrupt pickle", ["--model", m, "--preprocessing", str(f["corrupt_pkl"]),
                                      "--output-dir", out], {}),
        ("export", "corrupt model", ["--model", str(f["corrupt_keras"]), "--preprocessing", tx,
                                     "--output-dir", out], {}),
        ("export", "bad flag", ["--backend", "llvm"], {}),
        ("export", "unsupported model", ["--model", str(f["five"]), "--preprocessing", tx,
                                         "--output-dir", out], {}),
        ("describe", "missing file", [str(f["missing"])], {}),
        ("describe", "corrupt library", [str(f["corrupt_so"])], {}),
        ("describe", "corrupt pickle", [lib, "--model", m, "--preprocessing", str(f["corrupt_pkl"]),
                                        "--validation", data], {}),
        ("describe", "corrupt model", [lib, "--model", str(f["corrupt_keras"]), "--preprocessing", tx,
                                       "--validation", data], {}),
        ("describe", "bad flag", [lib, "--rows", "3"], {}),
        ("parity", "missing file", ["--library", str(f["missing"])], {}),
        ("parity", "corrupt pickle", ["--library", lib, "--header", str(f["header"]), "--model", m,
                                      "--preprocessing", str(f["corrupt_pkl"]), "--data", data,
                                      "--variants", "", "--output-dir", out], {}),
        ("parity", "bad flag", ["--rows", "ten"], {}),
        ("lamarr", "missing file", ["--library", str(f["missing"])], {}),
        ("lamarr", "corrupt file", ["--library", lib, "--sample", str(f["corrupt_feather"]),
                                    "--db", out + "/l.db"], {}),
        ("lamarr", "bad flag", ["--library", lib, "--rows", "0"], {}),
        ("bench", "missing file", ["--model", str(f["missing"]), "--output-dir", out], {}),
        ("bench", "corrupt pickle", ["--model", m, "--preprocessing", str(f["corrupt_pkl"]),
                                     "--quick", "--sections", "codegen", "--output-dir", out], {}),
        ("bench", "bad flag", ["--repeats", "0"], {}),
        ("bench", "unsupported model", ["--model", str(f["five"]), "--preprocessing", tx, "--quick",
                                        "--sections", "codegen", "--output-dir", out], {}),
    ]


def test_every_stage_is_covered(files, tiny_dataset, tmp_path):
    covered = {}
    for stage, what, _, _ in _cases(files, tiny_dataset, tmp_path):
        covered.setdefault(stage, set()).add(what.split()[0])
    assert sorted(covered) == sorted(STAGES) == sorted(cli.STAGES)
    for stage, kinds in covered.items():
        assert "bad" in kinds and ({"missing", "unwritable"} & kinds), stage
    for stage in ("validate", "export", "describe", "parity", "bench"):  # they load a tX.pkl
        assert "corrupt" in covered[stage], stage


@pytest.mark.parametrize("index", range(38))
def test_one_line_and_exit_1(index, files, tiny_dataset, tmp_path, monkeypatch, capsys):
    cases = _cases(files, tiny_dataset, tmp_path)
    assert len(cases) == 38  # keep the parametrize range in step
    stage, what, argv, env = cases[index]
    for name in config.KNOBS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EFFGEN_WORKDIR", str(tmp_path / "work"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = cli.main([stage, *argv])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 1, (what, captured.err)
    assert len(lines) == 1 and lines[0].startswith(f"effgen {stage}: "), (what, captured.err)
    assert "Traceback" not in captured.out + captured.err
    if "corrupt" in what and "model" in what:
        assert "corrupt" in lines[0] and "not found" not in lines[0].lower()


def test_a_bad_environment_value_never_breaks_help(monkeypatch, capsys):
    for name in ("BATCH_SIZE", "N_PARTICLES", "SEED", "MAX_EPOCHS",
                 "PRE_TRAINING_TIME_LIMIT_SECONDS", "FINE_TUNING_TIME_LIMIT_SECONDS"):
        monkeypatch.setenv(name, "abc")
    for stage in STAGES:
        assert cli.main([stage, "--help"]) == 0
        assert f"usage: effgen {stage}" in capsys.readouterr().out


def test_a_sample_too_small_for_every_split_is_refused_before_writing(tmp_path, capsys):
    from effgen.data.synth import write_sample

    sample = write_sample(tmp_path / "two.feather", 2, 0, progress=False)
    out = tmp_path / "data"
    rc = cli.main(["preprocess", "--input", str(sample), "--output-dir", str(out),
                   "--preprocessing", str(tmp_path / "tX.pkl")])
    err = capsys.readouterr().err
    # stderr also carries the progress bar (\r-separated); the error is one line of its own.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("effgen")]
    assert rc == 1 and len(lines) == 1 and "would be empty" in lines[0], err
    assert not out.exists() and not (tmp_path / "tX.pkl").exists()


@pytest.mark.parametrize("errno_", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_disk_is_one_line(errno_, tmp_path, monkeypatch, capsys):
    import errno
    import os

    import effgen.atomic

    def refuse(**kw):
        code = getattr(errno, errno_)
        raise OSError(code, os.strerror(code), str(kw.get("dir")))

    monkeypatch.setattr(effgen.atomic, "_mkstemp", refuse)
    rc = cli.main(["synth", "--n", "100", "--output", str(tmp_path / "s.feather")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(f"effgen synth: {tmp_path}: ") and "Traceback" not in err


@pytest.mark.parametrize("symbol", ["1efficiency", "exit", "effgen_core", "x" * 65])
@pytest.mark.parametrize("stage", ["lamarr", "parity"])
def test_a_bad_symbol_is_refused_first(stage, symbol, files, tmp_path, monkeypatch, capsys):
    """--symbol is checked with export's rules (effgen.codegen.symbols) before anything
    else: the library named is missing, yet the one line is about the symbol."""
    for name in config.KNOBS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EFFGEN_WORKDIR", str(tmp_path / "work"))
    argv = [stage, "--library", str(files["missing"]), "--symbol", symbol]
    if stage == "parity":
        argv += ["--model", str(files["missing"])]
    rc = cli.main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert rc == 1
    assert len(lines) == 1 and lines[0].startswith(f"effgen {stage}: symbol "), lines
    assert str(files["missing"]) not in lines[0]
