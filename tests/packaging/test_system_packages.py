"""scripts/ensure-system-packages.sh, which `make test` and `make demo` run first.

The script runs under a PATH holding only fakes: a fake ``apt-get`` (and ``sudo``) records its
calls and "installs" by creating the files the script checks; the real apt-get never runs. The
checked paths point into the test's folder through the script's environment variables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ensure-system-packages.sh"
BASH = shutil.which("bash") or "/bin/bash"
FMNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz"]

FAKE_APT = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["apt-get"] + sys.argv[1:]) + "\\n")
if "install" in sys.argv and os.environ.get("FAKE_INSTALLS") == "1":
    for path in (os.environ["DEEPHASH_CHROMIUM"], os.environ["DEEPHASH_CHROMEDRIVER"]):
        with open(path, "w") as f:
            f.write("#!/bin/sh\\n")
        os.chmod(path, 0o755)
    os.makedirs(os.environ["DEEPHASH_FMNIST_DIR"], exist_ok=True)
    for name in {files!r}:
        open(os.path.join(os.environ["DEEPHASH_FMNIST_DIR"], name), "wb").close()
"""

FAKE_SUDO = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["sudo"] + sys.argv[1:]) + "\\n")
args = sys.argv[1:]
env = dict(os.environ)
while args and "=" in args[0]:
    key, value = args.pop(0).split("=", 1)
    env[key] = value
os.execvpe(args[0], args, env)
"""


def _fake(bin_dir: Path, name: str, text: str) -> None:
    path = bin_dir / name
    path.write_text(text.format(python=sys.executable, files=FMNIST_FILES), encoding="utf-8")
    path.chmod(0o755)


def run_script(tmp_path: Path, mode: str = "test", *, apt: bool = False, sudo: bool = False, uid: int = 0,
               installs: bool = True, present: tuple[str, ...] = (), extra_env: dict | None = None):
    """Run the script with a PATH of fakes only; return ``(returncode, stderr lines, recorded calls)``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if apt:
        _fake(bin_dir, "apt-get", FAKE_APT)
    if sudo:
        _fake(bin_dir, "sudo", FAKE_SUDO)
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    env = {
        "PATH": str(bin_dir),
        "DEEPHASH_CHROMIUM": str(root / "chromium"),
        "DEEPHASH_CHROMEDRIVER": str(root / "chromedriver"),
        "DEEPHASH_FMNIST_DIR": str(root / "fashion-mnist"),
        "DEEPHASH_UID": str(uid),
        "FAKE_LOG": str(tmp_path / "calls.jsonl"),
        "FAKE_INSTALLS": "1" if installs else "0",
    }
    env.update(extra_env or {})
    if "chromium" in present or "chromedriver" in present:
        for name in present:
            if name != "fashion-mnist":
                (root / name).write_text("#!/bin/sh\n")
                (root / name).chmod(0o755)
    if "fashion-mnist" in present:
        (root / "fashion-mnist").mkdir(exist_ok=True)
        for name in FMNIST_FILES:
            (root / "fashion-mnist" / name).touch()
    proc = subprocess.run([BASH, str(SCRIPT), mode], env=env, capture_output=True, text=True, timeout=60)
    log = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, proc.stderr.splitlines(), calls


def test_without_apt_get_one_line_says_what_to_install_and_exits_1(tmp_path):
    code, lines, calls = run_script(tmp_path)
    assert code == 1 and len(lines) == 1 and calls == []
    line = lines[0]
    assert str(tmp_path / "root" / "chromium") in line and "Fashion-MNIST" in line
    assert line.endswith("run make test as root, or apt-get install chromium chromium-driver dataset-fashion-mnist")


def test_not_root_and_no_sudo_does_not_call_apt_get(tmp_path):
    code, lines, calls = run_script(tmp_path, apt=True, uid=1000, present=("chromium", "fashion-mnist"))
    assert code == 1 and calls == [] and len(lines) == 1
    assert "apt-get is not usable" in lines[0] and lines[0].endswith("apt-get install chromium-driver")


def test_as_root_runs_update_then_install_of_the_missing_packages(tmp_path):
    code, lines, calls = run_script(tmp_path, apt=True)
    assert code == 0, lines
    assert [c[1] for c in calls] == ["update", "install"]
    install = calls[1]
    assert "-y" in install and install[-3:] == ["chromium", "chromium-driver", "dataset-fashion-mnist"]
    assert lines[-1].startswith("deephash: installed chromium chromium-driver dataset-fashion-mnist in ")
    # a second run finds everything and calls nothing
    (tmp_path / "calls.jsonl").unlink()
    assert run_script(tmp_path, apt=True) == (0, [], [])


def test_only_the_missing_packages_are_installed(tmp_path):
    code, _, calls = run_script(tmp_path, apt=True, present=("chromium", "chromedriver"))
    assert code == 0 and [c[1] for c in calls] == ["update", "install"] and calls[1][-1] == "dataset-fashion-mnist"
    assert "chromium" not in calls[1]


def test_not_root_goes_through_sudo(tmp_path):
    code, lines, calls = run_script(tmp_path, apt=True, sudo=True, uid=1000)
    assert code == 0, lines
    assert [c[0] for c in calls] == ["sudo", "apt-get", "sudo", "apt-get"]
    assert calls[0][1:] == ["DEBIAN_FRONTEND=noninteractive", "apt-get", "update", "-qq"]
    assert calls[2][1:4] == ["DEBIAN_FRONTEND=noninteractive", "apt-get", "install"]
    assert calls[3][-3:] == ["chromium", "chromium-driver", "dataset-fashion-mnist"]


def test_an_install_that_leaves_a_package_missing_says_so_in_one_line(tmp_path):
    code, lines, calls = run_script(tmp_path, apt=True, installs=False, present=("chromium", "fashion-mnist"))
    assert code == 1 and [c[1] for c in calls] == ["update", "install"]
    assert lines[-1] == (f"deephash: {tmp_path / 'root' / 'chromedriver'} still missing after apt-get: install Debian's "
                         "chromium-driver (apt-get install chromium-driver)")


def test_demo_needs_only_the_data_and_reads_deephash_data(tmp_path):
    data = tmp_path / "mine" / "fashion-mnist"
    data.mkdir(parents=True)
    for name in FMNIST_FILES:
        (data / name.removesuffix(".gz")).touch()  # uncompressed files count too
    assert run_script(tmp_path, "demo", extra_env={"DEEPHASH_DATA": str(tmp_path / "mine")}) == (0, [], [])
    code, lines, _ = run_script(tmp_path, "demo")
    assert code == 1 and len(lines) == 1 and lines[0].endswith("run make demo as root, or apt-get install dataset-fashion-mnist")
    code, lines, _ = run_script(tmp_path, "bogus")
    assert code == 2 and "usage" in lines[0]


def test_make_test_runs_the_check_first_and_goes_on_when_it_fails():
    """`make test` runs the check, ignores its status (so the browser tests fail, not skip), then
    pytest; `make demo` stops when its data is missing; CI only calls `make test`."""
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry = subprocess.run(["make", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=env).stdout.splitlines()
    check = dry.index("bash scripts/ensure-system-packages.sh test || true")
    assert "pytest" in dry[check + 1]
    demo = subprocess.run(["make", "-n", "-B", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=env).stdout
    assert "bash scripts/ensure-system-packages.sh demo\n" in demo
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "exec make test" and not any("apt-get" in line for line in ci)


def test_browser_tests_fail_not_skip_and_say_how_to_install(tmp_path, monkeypatch):
    from helpers import playwright_api

    with pytest.raises(pytest.fail.Exception) as info:
        playwright_api(str(tmp_path / "no-chromium"))
    assert str(info.value) == (f"{tmp_path / 'no-chromium'} not found: run make test as root (it installs it), "
                               "or apt-get install chromium chromium-driver")
