"""Every shipped config through every command: train on a tiny slice of its data in the data set's
exact on-disk format, then evaluate, encode, index build / search / add / remove / info, report and
the service's writes with a graceful shutdown, each checked against an independent oracle
(``tests/config_chain.py``: brute-force popcount, a direct mAP formula, an index built from scratch).

The configs are the ones ``deephash configs`` lists when the tests are collected, so a config added
later is covered as it lands; one whose data set has no tiny-data recipe fails. One test per config
(one failure hides no other); one config's service runs as a real ``deephash serve`` process
stopped with SIGTERM, the others' in this process with the app's lifespan.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from config_chain import RECIPES, Chain, DataTree, in_process
from helpers import STAND_IN_TIMM_CFG, install_stand_in_timm

from deephash.cli import main
from deephash.config import load_config, shipped_config


def listed_configs() -> list[str]:
    """The names ``deephash configs`` prints, in its order."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["configs"]) == 0
    return [line.split(None, 1)[0] for line in out.getvalue().splitlines()]


CONFIGS = listed_configs()
#: The one config whose service is a real `deephash serve` process: the first with a hash head.
SERVED_BY_A_PROCESS = next(n for n in CONFIGS if load_config(shipped_config(n)).model.head == "hash")


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory):
    """``data_tree(dataset) -> DataTree``: each data set's tiny tree, written once for the module."""
    trees: dict[str, DataTree] = {}

    def get(dataset: str) -> DataTree:
        if dataset not in RECIPES:
            pytest.fail(f"data set {dataset!r} has no tiny-data recipe: add one to RECIPES in tests/config_chain.py")
        if dataset not in trees:
            trees[dataset] = RECIPES[dataset](tmp_path_factory.mktemp(f"data-{dataset}"))
        return trees[dataset]

    return get


def test_the_configs_tested_are_the_shipped_files():
    shipped = Path(__file__).resolve().parents[2] / "src" / "deephash" / "configs"
    assert CONFIGS == sorted(p.stem for p in shipped.glob("*.toml")) and len(CONFIGS) >= 9


@pytest.mark.parametrize("name", CONFIGS)
def test_every_command_on_a_shipped_config(name: str, data_tree, tmp_path: Path, capsys, monkeypatch):
    config = load_config(shipped_config(name))
    tree = data_tree(config.data.dataset)
    if config.model.backbone.startswith("timm:"):  # timm's API stood in for (it does not install beside this torch)
        calls = install_stand_in_timm(monkeypatch)
    Chain(in_process(capsys), tmp_path, name, tree, serve="process" if name == SERVED_BY_A_PROCESS else "app").go()
    if config.model.backbone.startswith("timm:"):  # training asked timm for its pretrained weights; loading did not
        assert [c["pretrained"] for c in calls][0] is config.model.pretrained and not any(c["pretrained"] for c in calls[1:])
        if config.data.image_size == 0:  # the size came from the (stand-in) pretrained configuration
            assert load_config(tmp_path / "run" / "config.toml").data.image_size == STAND_IN_TIMM_CFG[config.model.backbone[5:]]["input_size"][-1]
