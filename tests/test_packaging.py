"""The project as pip installs it: twistd finds both plugins from anywhere, and a real install holds what it must.

Each test runs the interpreter that runs the tests (the virtualenv's, with
the editable install ``./dev`` makes) in a subprocess, from a folder outside
the source tree and without PYTHONPATH unless a test sets it: twistd does not
put the current folder on sys.path, so only an install that works is seen.
These are blocking subprocess calls in plain tests, each with a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from gridd.server import tap as server_tap
from gridd.worker import tap as worker_tap

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TWISTD = "from twisted.scripts.twistd import run; run()"
TIMEOUT = 120
PLUGINS = {"gridd", "gridworker"}


def python(code: str, *args: str, cwd: Path, pythonpath: Path | None = None, hide_source: bool = False):
    """Run ``code`` with this interpreter in ``cwd``; ``hide_source`` drops the source tree from sys.path first.

    The editable install puts the source tree on sys.path through a .pth
    file; a test of another install must not find the plugins there instead.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    if hide_source:
        code = f"import os, sys; sys.path[:] = [p for p in sys.path if os.path.realpath(p) != {str(ROOT)!r}]; {code}"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def twistd_commands(help_text: str) -> set[str]:
    """The plugin names in the Commands section of ``twistd --help``."""
    commands = help_text.split("\nCommands:\n", 1)[1]
    return set(re.findall(r"^ {4}(\S+)", commands, re.MULTILINE))


def test_editable_install_twistd_help_lists_both_plugins_from_outside_the_tree(tmp_path):
    """With the editable install and no PYTHONPATH, `twistd --help` run elsewhere lists gridd and gridworker."""
    done = python(TWISTD, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert PLUGINS <= twistd_commands(done.stdout), done.stdout
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "plugin, options", [("gridd", server_tap.Options), ("gridworker", worker_tap.Options)], ids=["gridd", "gridworker"]
)
def test_twistd_plugin_help_explains_every_option(tmp_path, plugin, options):
    """`twistd gridd --help` and `twistd gridworker --help`, run elsewhere, exit 0 and explain every option."""
    done = python(TWISTD, plugin, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    parsed = options()
    for name in parsed.longOpt:
        name = name.rstrip("=")
        assert re.search(rf"^ +(-\w, )?--{re.escape(name)}\b", done.stdout, re.MULTILINE), name
        assert parsed.docs.get(name), f"--{name} has no explanation"
    assert done.stdout.startswith(f"Usage: twistd [options] {plugin} [options]"), done.stdout[:200]


# -- a real (non-editable) install ------------------------------------------------------


def missing_build_requirements() -> list[str]:
    """The [build-system] requirements this interpreter lacks (empty: it can build without isolation)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    missing = []
    for spec in requires:
        req = Requirement(spec)
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{spec} (not installed)")
            continue
        if not req.specifier.contains(have, prereleases=True):
            missing.append(f"{spec} (have {have})")
    return missing


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps --target DIR`` of a copy of the source tree; DIR.

    A copy, because building writes build/ and gridd.egg-info into the tree it
    builds, and the checkout is shared. With setuptools and wheel as
    pyproject.toml's [build-system] asks in this interpreter, the build is
    ``--no-build-isolation --no-index``: offline. Without them pip builds in
    isolation and fetches them from the configured package index; if it cannot
    reach one, the tests are skipped, saying why.
    """
    base = tmp_path_factory.mktemp("install")
    source, target = base / "src", base / "target"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "dropin.cache",
            ".pytest_cache", ".hypothesis", "_demo", "_data", "gridd-data",
        ),
    )
    missing = missing_build_requirements()
    isolation = [] if missing else ["--no-build-isolation", "--no-index"]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet", "--timeout", "30",
         *isolation, "--target", str(target), str(source)],
        cwd=base, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        output = done.stdout + done.stderr
        unreachable = ("No matching distribution found", "Could not find a version", "NewConnectionError")
        if missing and any(s in output for s in unreachable):
            wanted = " ".join(repr(spec.split(" (")[0]) for spec in missing)
            pytest.skip(
                f"cannot build gridd: this interpreter lacks {', '.join(missing)} and pip could not fetch them "
                f"from a package index; `pip install {wanted}` here builds offline"
            )
        pytest.fail(f"pip install --target failed ({' '.join(isolation) or 'isolated build'}):\n{output}")
    return target


def test_install_ships_the_plugin_file_without_package_markers(installed):
    """A real install holds twisted/plugins/gridd_plugins.py and neither twisted/__init__.py nor its plugins' one."""
    assert (installed / "twisted" / "plugins" / "gridd_plugins.py").is_file()
    # Either file would shadow or overwrite Twisted's own, and uninstalling gridd would then break twistd.
    assert not (installed / "twisted" / "plugins" / "__init__.py").exists()
    assert not (installed / "twisted" / "__init__.py").exists()
    assert sorted(p.name for p in (installed / "twisted").iterdir()) == ["plugins"]
    top = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")}
    assert top - {"bin"} == {"gridd", "twisted"}, top  # no tests/, bench/ or protocols/ at the top of site-packages


def test_install_ships_every_package_of_the_tree(installed):
    """Every package under gridd/ is in the install, each of its modules too: none left out of pyproject.toml."""
    source = sorted(p.relative_to(ROOT) for p in (ROOT / "gridd").rglob("*.py") if "__pycache__" not in p.parts)
    assert source
    missing = [str(path) for path in source if not (installed / path).is_file()]
    assert not missing, f"not installed: {missing}"


def test_install_ships_every_sql_migration_as_package_data(installed):
    """Every SQL migration of both dialects is in the install, byte for byte."""
    for dialect in ("sqlite", "mysql"):
        source = sorted((ROOT / "gridd" / "store" / "migrations" / dialect).glob("*.sql"))
        shipped = installed / "gridd" / "store" / "migrations" / dialect
        assert source, dialect
        assert sorted(p.name for p in shipped.glob("*.sql")) == [p.name for p in source], dialect
        for path in source:
            assert (shipped / path.name).read_bytes() == path.read_bytes(), path.name


def test_install_twistd_help_lists_both_plugins_from_the_install_alone(installed, tmp_path):
    """With PYTHONPATH=DIR and the source tree out of sys.path, twistd lists both plugins and loads them from DIR."""
    where = python(
        "import gridd, twisted.plugins.gridd_plugins as p; print(gridd.__file__); print(p.__file__)",
        cwd=tmp_path,
        pythonpath=installed,
        hide_source=True,
    )
    assert where.returncode == 0, where.stderr
    assert all(Path(f).is_relative_to(installed) for f in where.stdout.split()), where.stdout
    done = python(TWISTD, "--help", cwd=tmp_path, pythonpath=installed, hide_source=True)
    assert done.returncode == 0, done.stderr
    assert PLUGINS <= twistd_commands(done.stdout), done.stdout
    served = python(TWISTD, "gridworker", "--help", cwd=tmp_path, pythonpath=installed, hide_source=True)
    assert served.returncode == 0 and "--server" in served.stdout, served.stderr
