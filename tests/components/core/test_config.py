from __future__ import annotations

import pytest

from components.core.config import (
    ConfigError,
    TesseraConfig,
    available_profiles,
    flatten,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
)


def test_profiles_load_and_round_trip(tmp_path):
    assert {"tiny", "demo", "small"} <= set(available_profiles())
    for name in ("tiny", "demo", "small"):
        cfg = load_config(name)
        assert cfg.profile == name
        path = tmp_path / f"{name}.yaml"
        path.write_text(to_yaml(cfg))
        assert load_config(path) == cfg
        assert from_dict(TesseraConfig, to_dict(cfg)) == cfg


def test_config_is_frozen():
    cfg = load_config("tiny")
    with pytest.raises(AttributeError):
        cfg.seed = 3


@pytest.mark.fault("bad input: configs")
def test_unknown_key_names_full_path_and_allowed_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingest:\n  wokers: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "ingest.wokers" in msg and "workers" in msg and "allowed keys at ingest" in msg


@pytest.mark.fault("bad input: configs")
def test_unknown_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingset: {}\n")
    with pytest.raises(ConfigError, match="unknown key ingset"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("ingest.workers=two", "ingest.workers: expected an integer, got 'two'"),
        ("ingest.workers=true", "ingest.workers: expected an integer"),
        ("validate.fps_range=[1, 2, 3]", "validate.fps_range: expected 2 items"),
        ("validate.mostly=high", "validate.mostly: expected a number"),
        ("demo_data.include_real_clips=3", "demo_data.include_real_clips: expected true or false"),
        ("ingest=3", "ingest: expected a mapping"),
    ],
)
@pytest.mark.fault("bad input: configs")
def test_wrong_types_raise_with_key_path(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert fragment in str(err.value)


def test_override_precedence():
    default = TesseraConfig()
    tiny = load_config("tiny")
    assert tiny.demo_data.num_clips != default.demo_data.num_clips  # profile beats default
    cfg = load_config("tiny", ["demo_data.num_clips=3", "validate.fps_range=[2, 30]"])
    assert cfg.demo_data.num_clips == 3  # --set beats profile
    assert cfg.validate.fps_range == (2.0, 30.0)
    assert cfg.ingest == tiny.ingest  # untouched sections keep the profile's values
    assert load_config("tiny", ["seed=1", "seed=2"]).seed == 2  # last override wins


def test_int_accepted_where_float_expected():
    assert load_config("tiny", ["validate.mostly=1"]).validate.mostly == 1.0


@pytest.mark.fault("bad input: configs")
def test_bad_override_syntax_and_unknown_profile():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["ingest.workers"])
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_config("huge")


def test_flatten_for_mlflow_params():
    flat = flatten(load_config("tiny"))
    assert flat["ingest.workers"] == 1
    assert flat["profile"] == "tiny"
    assert all(not isinstance(v, dict) for v in flat.values())


def test_environment_defaults(monkeypatch, tmp_path):
    from components.core.config import Environment

    monkeypatch.delenv("TESSERA_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    env = Environment.read()
    assert env.home == tmp_path / "var"
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "h"))
    assert Environment.read().home == tmp_path / "h"
    assert load_config("tiny").store_uri() == str(tmp_path / "h" / "store")


def test_partial_nested_section_keeps_the_sections_own_defaults():
    base = load_config("tiny")
    cfg = load_config("tiny", ["train_dit.train.steps=3"])
    assert cfg.train_dit.train.steps == 3
    # everything else in train_dit.train is the profile's / TrainDiTConfig's, not TrainConfig()'s
    assert cfg.train_dit.train.lr == base.train_dit.train.lr
    assert cfg.train_dit.train.micro_batch == base.train_dit.train.micro_batch
    assert TesseraConfig().train_dit.train.warmup_steps == 30  # TrainConfig() alone says 20
    assert load_config("demo", ["train_dit.train.steps=3"]).train_dit.train.warmup_steps == (
        load_config("demo").train_dit.train.warmup_steps
    )


def test_exponent_without_dot_is_a_number():
    assert load_config("tiny", ["train_dit.train.lr=3e-4"]).train_dit.train.lr == 3e-4
