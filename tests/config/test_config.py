"""The TOML config schema: defaults, validation messages, --set overrides, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from deephash.config import (
    Config,
    config_description,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
    resolve_config_path,
    shipped_config,
    shipped_config_names,
    shipped_configs,
)
from deephash.errors import ConfigError, NotFoundError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_values_from_file(tmp_path):
    path = write(tmp_path, 'name = "n"\nseed = 7\n[model]\nbits = 32\n[optimizer]\nlr = 1\n'
                           '[[schedules]]\nattribute = "quantization_weight"\nstart = 1\nend = 16\n')
    config = load_config(path)
    assert (config.name, config.seed, config.model.bits) == ("n", 7, 32)
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)  # int accepted for a float
    assert config.schedules[0].end == 16.0 and config.schedules[0].epochs == 0
    assert config.model.backbone == Config().model.backbone  # untouched keys keep their defaults


def test_unknown_key_names_key_file_and_closest_key(tmp_path):
    path = write(tmp_path, "[model]\nbitz = 48\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "unknown key 'model.bitz'" in message and str(path) in message and "'model.bits'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "key", "expected", "got"),
    [
        ('[model]\nbits = "48"\n', "model.bits", "an integer", "str '48'"),
        ("[model]\nbits = 4.5\n", "model.bits", "an integer", "float 4.5"),
        ("[optimizer]\nlr = true\n", "optimizer.lr", "a number", "boolean True"),
        ("seed = [1]\n", "seed", "an integer", "an array"),
        ('[eval]\nks = [10, "x"]\n', "eval.ks[1]", "an integer", "str 'x'"),
        ("model = 3\n", "model", "a table", "int 3"),
        ('[loss]\nparams = "margin"\n', "loss.params", "a table", "str 'margin'"),
    ],
)
def test_wrong_type_names_key_expected_got_and_file(tmp_path, text, key, expected, got):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{key} must be {expected}, got {got} in {path}"


def test_bad_choice_and_bad_value(tmp_path):
    with pytest.raises(ConfigError, match=r"data.dataset must be one of .* got 'imagenet'"):
        load_config(write(tmp_path, '[data]\ndataset = "imagenet"\n'))
    with pytest.raises(ConfigError, match="device must be"):
        load_config(write(tmp_path, 'device = "gpu"\n'))
    with pytest.raises(ConfigError, match="model.bits must be at least 8"):
        load_config(write(tmp_path, "[model]\nbits = 4\n"))


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\nbits = 3\n"))
    with pytest.raises(NotFoundError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_overrides_are_toml_literals_with_string_fallback(tmp_path):
    path = write(tmp_path, "[loss]\nname = 'online-triplet'\n")
    config = load_config(path, ["model.bits=16", "loss.params.margin=0.5", "name=my run", "optimizer.lr=1e-2",
                                "data.augment={crop_padding = 2}", "eval.ks=[1, 5]"])
    assert config.model.bits == 16 and config.loss.params == {"margin": 0.5}
    assert config.name == "my run" and config.optimizer.lr == 0.01
    assert config.data.augment == {"crop_padding": 2} and config.eval.ks == [1, 5]
    assert parse_override("a.b = 'x y'") == (["a", "b"], "x y")
    with pytest.raises(ConfigError, match="unknown key 'model.bitz'.*--set"):
        load_config(path, ["model.bitz=16"])
    with pytest.raises(ConfigError, match="model.bits must be an integer"):
        load_config(path, ["model.bits=many"])
    with pytest.raises(ConfigError, match="expects key=value"):
        load_config(path, ["model.bits"])


def test_dump_round_trips(tmp_path):
    config = config_from_dict({"model": {"backbone": "fmnist-cnn", "backbone_params": {"width": 8, "depth": [1, 2]}},
                               "loss": {"name": "dtsh"},
                               "schedules": [{"attribute": "quantization_weight", "start": 1.0, "end": 2.0}]},
                              overrides=["selector.name=semihard", "selector.params.margin=0.2"])
    text = dump_config(config)
    assert load_config(write(tmp_path, text)) == config


SHIPPED = sorted((REPO / "src" / "deephash" / "configs").glob("*.toml"))


def test_the_package_holds_the_shipped_configs():
    assert len(SHIPPED) >= 7 and not (REPO / "configs").exists()  # one copy, inside the package
    assert shipped_config_names() == [path.stem for path in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_by_bare_name_from_any_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(path.stem)
    assert config.name == path.stem
    assert config == load_config(path)
    assert Path(str(resolve_config_path(path.stem))).resolve() == path.resolve()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_has_a_one_line_description(path):
    first, second = path.read_text(encoding="utf-8").splitlines()[:2]
    assert first.startswith("# ") and second == "#"  # a summary line, then the details
    description = shipped_configs()[path.stem]
    assert description == first[2:] and 20 <= len(description) <= 100


def test_description_is_the_first_comment_line():
    assert config_description("#  One line.\n# more\nname = 'x'\n") == "One line."
    assert config_description('name = "x"\n# late comment\n') == ""


def test_a_file_in_the_working_directory_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, 'name = "local"\n', name="fashion-mnist-48")
    assert load_config("fashion-mnist-48").name == "local"
    assert load_config("fashion-mnist-16").name == "fashion-mnist-16"  # no configs/ folder needed


def test_unknown_bare_name_lists_the_shipped_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (lambda: load_config("fashion-mnist-47"), lambda: shipped_config("fashion-mnist-47")):
        with pytest.raises(NotFoundError) as info:
            call()
        message = str(info.value)
        assert "fashion-mnist-47" in message and "\n" not in message
        assert all(path.stem in message for path in SHIPPED)
