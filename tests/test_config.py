"""The table of defaults as the CLI reads it: flag > environment > table, environment
values read lazily and checked, every knob documented."""

import pytest

from effgen import cli, config
from effgen.errors import ConfigError


def _parsed(argv, monkeypatch, **env):
    for name in config.KNOBS:
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args, _ = cli.build_parser().parse_known_args(argv)
    config.resolve_lazy(args)
    return args


def test_flag_beats_environment_beats_table(monkeypatch):
    assert _parsed(["train"], monkeypatch).batch_size == config.KNOBS["BATCH_SIZE"].default
    assert _parsed(["train"], monkeypatch, BATCH_SIZE="123").batch_size == 123
    assert _parsed(["train", "--batch-size", "7"], monkeypatch, BATCH_SIZE="123").batch_size == 7
    assert _parsed(["train"], monkeypatch, SEED="5").seed == 5  # SEED reaches training
    assert _parsed(["synth"], monkeypatch, N_PARTICLES="2e6").n == 2_000_000


def test_one_seed_and_one_batch_size_for_every_stage(monkeypatch):
    seeds = {_parsed([stage], monkeypatch).seed for stage in ("synth", "preprocess", "train")}
    assert seeds == {config.KNOBS["SEED"].default}
    # The main job's batch size, whether make or `effgen train` runs it: unset in both, so
    # the recipe's (make passes --batch-size only when BATCH_SIZE is set).
    assert _parsed(["train"], monkeypatch).batch_size is None
    assert "\nBATCH_SIZE ?=\n" in config.make_include()


@pytest.mark.parametrize("raw", ["1.9", "abc", "nan", "-3", "inf", ""])
def test_bad_integer_values_are_refused_not_truncated(raw):
    with pytest.raises(ConfigError, match="N_PARTICLES"):
        config.parse(config.KNOBS["N_PARTICLES"], raw, "environment variable N_PARTICLES")


def test_an_empty_environment_variable_means_unset(monkeypatch):
    monkeypatch.setenv("N_PARTICLES", "")
    assert config.value("N_PARTICLES") == config.KNOBS["N_PARTICLES"].default


def test_every_knob_has_a_type_a_doc_and_a_parseable_default():
    for knob in config.KNOBS.values():
        assert knob.doc and knob.type in ("int", "float", "str", "path", "flags")
        if knob.type in ("int", "float") and knob.default is not None:  # None: the recipe's
            assert config.parse(knob, str(knob.default)) == knob.default
    assert "| `BATCH_SIZE` | (the recipe's) |" in config.markdown_table()
    assert "| `N_PARTICLES` | `4000000` |" in config.markdown_table()
