"""The request path compiled with mypyc (setup.py, tidegate/compiled.py): installed compiled, used all
together or not at all, and the same behaviour as Python: the data-plane tests run again on the Python copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tidegate import compiled

ROOT = Path(__file__).resolve().parent.parent
PURE = compiled.pure_python_requested()

# What a run of the Python copies repeats: everything that sends traffic through the HTTP/1.1 request path,
# and through the TCP, TLS and UDP relays.
DATA_PLANE_TESTS = ["tests/test_fastlane.py", "tests/test_dataplane.py", "tests/test_resilience.py",
                    "tests/test_balancing.py", "tests/test_accesslog.py", "tests/test_router.py",
                    "tests/test_l4.py", "tests/test_compiled.py::test_the_request_path_runs_as_built"]

SHOW = ("import sys, tidegate.compiled as c\n"
        "for name in c.HOT_MODULES: __import__(name)\n"
        "print(c.describe())\n"
        "for name in c.HOT_MODULES: print(sys.modules[name].__file__)\n")


def _show(env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """In a new interpreter: how the hot modules run, and the file each was loaded from."""
    result = subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    first, *files = result.stdout.splitlines()
    return first, files


def test_the_request_path_runs_as_built():
    """An install compiles the hot modules (the README's commands need gcc); TIDEGATE_PURE_PYTHON=1 runs the
    Python copies. A build that silently fell back to Python would fail here, not just run slower."""
    described, files = _show()
    assert len(files) == len(compiled.HOT_MODULES)
    if PURE:
        assert described == "pure Python (TIDEGATE_PURE_PYTHON is set)"
        assert all(f.endswith(".py") for f in files), files
    else:
        assert described == "compiled with mypyc"
        assert all(f.endswith(".so") for f in files), files
        assert _show({"TIDEGATE_PURE_PYTHON": "0"})[0] == "compiled with mypyc"  # "0" asks for nothing


@pytest.mark.skipif(PURE, reason="the compiled copies are not in use in this run")
def test_an_edited_hot_module_sends_all_of_them_back_to_python(tmp_path: Path):
    """In a source checkout, a hot module changed after its compile runs as Python, and so do the others (a
    compiled module would refuse the Python copy's classes)."""
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "setup.py").write_text("")  # a checkout, as far as compiled.py can tell
    env = {"PYTHONPATH": str(tmp_path / "src")}
    described, files = _show(env)
    assert described == "compiled with mypyc" and all(f.startswith(str(tmp_path)) for f in files), files

    edited = tmp_path / "src" / "tidegate" / "router.py"
    later = time.time() + 5
    os.utime(edited, (later, later))
    described, files = _show(env)
    assert described == "pure Python (router.py changed after it was compiled (install again to compile it))"
    assert all(f.endswith(".py") and f.startswith(str(tmp_path)) for f in files), files


@pytest.mark.skipif(PURE, reason="this run is the Python one already")
def test_the_data_plane_tests_pass_on_the_python_copies():
    """The pure-Python fallback is kept working: the data-plane tests again, with TIDEGATE_PURE_PYTHON=1."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DATA_PLANE_TESTS],
                            cwd=ROOT, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL,
                            env={**os.environ, "TIDEGATE_PURE_PYTHON": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
