"""Every exception that reaches a command line is one line: status 2 for usage and data errors,
1 (with "please report") for anything else; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

import deephash.cli as cli
import deephash.serve.cli as serve_cli
from deephash.errors import CodeLengthError, ConfigError, DataFormatError, DeephashError, NotFoundError, TrainingDiverged
from deephash.serve.__main__ import main as serve_main


def _toml_error() -> tomllib.TOMLDecodeError:
    try:
        tomllib.loads("[model\n")
    except tomllib.TOMLDecodeError as error:
        return error
    raise AssertionError("the TOML above is invalid")


USER_ERRORS = [
    (DeephashError("k must be >= 1, got 0"), "deephash: error: k must be >= 1, got 0"),
    (ConfigError("cfg.toml: model.bits must be an integer\n(more)"), "deephash: error: cfg.toml: model.bits must be an integer"),
    (DataFormatError("code file a.npz: missing key 'bits'"), "deephash: error: code file a.npz: missing key 'bits'"),
    (NotFoundError("run r does not exist"), "deephash: error: run r does not exist"),
    (CodeLengthError("12-bit codes but index holds 24"), "deephash: error: 12-bit codes but index holds 24"),
    (TrainingDiverged("loss is NaN at step 3"), "deephash: error: loss is NaN at step 3"),
    (FileNotFoundError(2, "No such file or directory", "/data/x.png"), "deephash: error: /data/x.png: No such file or directory"),
    (PermissionError(13, "Permission denied", "/runs/r"), "deephash: error: /runs/r: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "/runs"), "deephash: error: /runs: Is a directory"),
    (OSError(28, "No space left on device"), "deephash: error: [Errno 28] No space left on device"),
    (_toml_error(), "deephash: error: not valid TOML: "),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "deephash: error: 'utf-8' codec can't decode"),
]


def _raising(error: BaseException):
    def handler(args):
        raise error
    return handler


@pytest.mark.parametrize("error, line", USER_ERRORS, ids=[type(e).__name__ for e, _ in USER_ERRORS])
def test_user_errors_are_one_line_and_status_2(monkeypatch, capsys, error, line):
    monkeypatch.setattr(cli, "_cmd_configs", _raising(error))
    assert cli.main(["configs"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), captured.err
    assert captured.out == ""


@pytest.mark.parametrize("error", [RuntimeError("boom\nsecond line"), KeyError("x"), TypeError(), AssertionError("no")])
def test_other_errors_are_internal_one_line_and_status_1(monkeypatch, capsys, error):
    monkeypatch.setattr(cli, "_cmd_configs", _raising(error))
    assert cli.main(["configs"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"deephash: internal error: {type(error).__name__}") and "please report" in lines[0]
    assert "second line" not in lines[0]


@pytest.mark.parametrize("error", [ConfigError("bad"), RuntimeError("boom")])
def test_debug_lets_the_exception_and_its_traceback_through(monkeypatch, error):
    monkeypatch.setattr(cli, "_cmd_configs", _raising(error))
    with pytest.raises(type(error)):
        cli.main(["--debug", "configs"])


def test_a_real_unreadable_config_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "binary.toml"
    bad.write_bytes(b"\xff\xfe\x00bits")
    assert cli.main(["train", str(bad)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"deephash: error: config {bad} is not UTF-8 text"]


_BOOM = ("import sys, deephash.cli as c\n"
         "def boom(args):\n    raise RuntimeError('boom')\n"
         "c._cmd_configs = boom\nsys.exit(c.main(sys.argv[1:]))\n")


def test_an_internal_error_in_a_process_is_one_line_without_a_traceback():
    plain = subprocess.run([sys.executable, "-c", _BOOM, "configs"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    assert len(plain.stderr.strip().splitlines()) == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("deephash: internal error: RuntimeError: boom") and "please report" in plain.stderr


def test_python_m_deephash_serve_reports_errors_the_same_way(monkeypatch, capsys):
    monkeypatch.setattr(serve_cli, "run_serve", _raising(NotFoundError("index i does not exist")))
    assert serve_main(["i", "--run", "r"]) == 2
    assert capsys.readouterr().err.splitlines() == ["deephash serve: error: index i does not exist"]
    monkeypatch.setattr(serve_cli, "run_serve", _raising(ZeroDivisionError("division by zero")))
    assert serve_main(["i", "--run", "r"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deephash serve: internal error: ZeroDivisionError") and "please report" in lines[0]
    with pytest.raises(ZeroDivisionError):
        serve_main(["--debug", "i", "--run", "r"])
