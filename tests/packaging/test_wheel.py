"""deephash as a user installs it: a wheel built from the source, installed into a fresh virtual
environment, used from a directory outside the checkout.

No network: the test venv's own setuptools builds the wheel (``--no-build-isolation``) and the new
environment reuses the test venv's installed dependencies through a plain path line in a ``.pth``
file (which does not run the test venv's own ``.pth`` files, so its editable install of the
checkout stays invisible). Oracles: the wheel's file list against the source tree, the shipped
config files and ``pyproject.toml`` read directly, and search distances against a brute-force
Hamming distance over the codes ``deephash encode`` writes, with every other command of
``tests/config_chain.py`` (its evaluate, index changes, report and service checks) on the shipped
config fashion-mnist-48 and a slice of the real Fashion-MNIST found through ``DEEPHASH_DATA``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from config_chain import Chain, fashion_mnist_slice, in_subprocess

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "deephash"
SHIPPED = sorted((PACKAGE / "configs").glob("*.toml"))
STATIC = sorted((PACKAGE / "serve" / "static").iterdir())

pytestmark = pytest.mark.slow


def _run(args: list, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would put the checkout or the test venv first."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_NO_INPUT="1", PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source (a stale ``build/`` in the checkout can't leak in)."""
    source = tmp_path_factory.mktemp("source")
    for name in ["pyproject.toml", "README.md", *[p.name for p in REPO.glob("LICENSE*")]]:
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", out, source], cwd=out, env=_clean_env())
    wheels = list(out.glob("deephash-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed and the test venv's dependencies importable."""
    root = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent, env=_clean_env())
    python = root / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root, env=_clean_env()).strip())
    deps = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))  # the test venv's
    (site / "_test_venv_dependencies.pth").write_text("".join(f"{path}\n" for path in deps), encoding="utf-8")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=root, env=_clean_env())
    return root


def test_the_wheel_holds_every_file_of_the_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    source = {path.relative_to(PACKAGE.parent).as_posix() for path in PACKAGE.rglob("*")
              if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}
    assert source <= names, f"missing from the wheel: {sorted(source - names)}"
    assert len(SHIPPED) >= 7 and {f"deephash/configs/{p.name}" for p in SHIPPED} <= names
    assert {"deephash/serve/static/index.html", "deephash/serve/static/app.js",
            "deephash/serve/static/style.css"} <= {f"deephash/serve/static/{p.name}" for p in STATIC} <= names
    assert {n for n in names if not n.startswith("deephash/")} == {
        n for n in names if n.startswith("deephash-") and ".dist-info/" in n}  # nothing outside the package


def test_installed_wheel_runs_every_command_outside_the_checkout(venv, tmp_path, monkeypatch):
    data = tmp_path / "data"
    work = tmp_path / "work"  # a user's directory: no configs/, no src/
    work.mkdir()
    env = _clean_env(DEEPHASH_DATA=str(data))
    deephash, python = venv / "bin" / "deephash", venv / "bin" / "python"
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]

    where, imported_version = _run([python, "-c", "import deephash; print(deephash.__file__); print(deephash.__version__)"],
                                   cwd=work, env=env).split()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"deephash imported from {where}, not the new venv"
    assert imported_version == version
    assert _run([deephash, "--version"], cwd=work, env=env).strip() == f"deephash {version}"

    listed = [line.split(None, 1) for line in _run([deephash, "configs"], cwd=work, env=env).splitlines()]
    assert [name for name, _ in listed] == [p.stem for p in SHIPPED]
    assert [description for _, description in listed] == [
        p.read_text(encoding="utf-8").splitlines()[0].removeprefix("# ") for p in SHIPPED]
    shown = _run([deephash, "configs", "show", "fashion-mnist-48"], cwd=work, env=env)
    assert shown == (PACKAGE / "configs" / "fashion-mnist-48.toml").read_text(encoding="utf-8")

    # the same command chain as tests/reliability/test_shipped_configs.py, through the wheel's `deephash`
    # (the service a real `deephash serve` process): every result against its oracle
    monkeypatch.setenv("DEEPHASH_DATA", str(data))  # where the checks here read the split images
    tree = fashion_mnist_slice(data)
    Chain(in_subprocess([str(deephash)], cwd=work, env=env), work, "fashion-mnist-48", tree, serve="process",
          serve_command=[str(deephash)], env=env, serve_cwd=work, data_sets=[]).go()
