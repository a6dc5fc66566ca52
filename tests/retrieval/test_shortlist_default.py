"""One shortlist default: the search that evaluate measures is the search that is served."""

from __future__ import annotations

import inspect

from deephash.cli import build_parser
from deephash.config import EvalConfig
from deephash.report import nearest
from deephash.retrieval.search import DEFAULT_SHORTLIST, search
from deephash.runs.evaluation import near_duplicate_recall
from deephash.runs.indexing import search_run
from deephash.serve.service import SearchService


def _default(function, name="shortlist"):
    return inspect.signature(function).parameters[name].default


def test_every_two_stage_search_defaults_to_the_one_shortlist():
    assert DEFAULT_SHORTLIST == 1000  # the size behind the published evaluate numbers
    assert EvalConfig().rerank_shortlist == DEFAULT_SHORTLIST
    # the service keeps its shortlist (constructor), which its search uses unless a call gives one
    for function in (search, search_run, SearchService.__init__, nearest, near_duplicate_recall):
        assert _default(function) == DEFAULT_SHORTLIST, function.__qualname__
    assert _default(SearchService.search) is None


def test_the_cli_leaves_the_default_to_the_library():
    args = build_parser().parse_args(["search", "INDEX", "--run", "RUN", "test:0"])
    assert args.shortlist is None  # _cmd_search then passes DEFAULT_SHORTLIST
    assert build_parser().parse_args(["search", "INDEX", "--run", "RUN", "test:0", "--shortlist", "7"]).shortlist == 7
