"""``deephash configs``, ``deephash configs show NAME`` and ``deephash --version``.

Oracles: the shipped TOML files and ``pyproject.toml`` read directly from the checkout.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import deephash
from deephash.cli import main

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "src" / "deephash" / "configs").glob("*.toml"))


def test_configs_lists_every_shipped_name_with_its_summary_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(None, 1) for line in lines] == [
        [p.stem, p.read_text(encoding="utf-8").splitlines()[0].removeprefix("# ")] for p in SHIPPED]
    assert len({line.index(line.split(None, 1)[1]) for line in lines}) == 1  # descriptions in one column


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_configs_show_prints_the_file_to_copy(path, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["configs", "show", path.stem]) == 0
    shown = capsys.readouterr().out
    assert shown == path.read_text(encoding="utf-8")
    (tmp_path / "mine.toml").write_text(shown, encoding="utf-8")  # what a user then edits and trains
    from deephash.config import load_config

    assert load_config(tmp_path / "mine.toml") == load_config(path)


def test_configs_show_unknown_name_is_one_line_listing_the_names(capsys):
    assert main(["configs", "show", "fashion-mnist-47"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("deephash: error: ") and "'fashion-mnist-47'" in line
    assert all(p.stem in line for p in SHIPPED)


def test_version_is_the_package_metadata_version(capsys):
    assert main(["--version"]) == 0
    installed = metadata.version("deephash")
    assert capsys.readouterr().out.strip() == f"deephash {installed}"
    assert deephash.__version__ == installed
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert installed == declared  # pyproject.toml is the one place that holds it
