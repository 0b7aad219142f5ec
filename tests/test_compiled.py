"""The compiled hot path (tidegate/compiled.py, setup.py): used when built and fresh, and the pure-Python
source in every other case, which serves just the same."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys

import pytest

from tests.harness import TIDEGATE, echo_servers, free_port, request, tidegate_run
from tests.manifests import http_gateway, route, service
from tidegate import compiled


def _spec(tmp_path, built_age: float | None, pure: bool = False, monkeypatch=None):
    """Where the finder sends `tidegate.router` for a folder with router.py and, when built_age is not None,
    a compiled router that many seconds older than the source (negative: newer)."""
    source = tmp_path / "router.py"
    source.write_text("VALUE = 1\n")
    now = source.stat().st_mtime
    if built_age is not None:
        built = tmp_path / ("router" + importlib.machinery.EXTENSION_SUFFIXES[0])
        built.write_bytes(b"")
        os.utime(built, (now - built_age, now - built_age))
    if monkeypatch is not None:
        monkeypatch.setenv(compiled.PURE_ENV, "1" if pure else "0")
    return compiled._SourceWhenNotCompiled().find_spec("tidegate.router", [str(tmp_path)])


def test_the_source_is_used_unless_a_fresh_compiled_module_is_there(tmp_path, monkeypatch):
    assert _spec(tmp_path, None, monkeypatch=monkeypatch).origin == str(tmp_path / "router.py")
    assert compiled.loaded["tidegate.router"] == "source: not compiled"
    # Edited since the build: the edit wins over the stale build.
    assert _spec(tmp_path, 60, monkeypatch=monkeypatch).origin == str(tmp_path / "router.py")
    assert compiled.loaded["tidegate.router"] == "source: compiled file older than the source"
    # Fresh: the standard finders take it (extension modules first).
    assert _spec(tmp_path, -60, monkeypatch=monkeypatch) is None
    assert compiled.loaded["tidegate.router"] == "compiled"
    # Asked for pure Python.
    assert _spec(tmp_path, -60, pure=True, monkeypatch=monkeypatch).origin == str(tmp_path / "router.py")
    # Modules that are not hot are none of its business.
    assert compiled._SourceWhenNotCompiled().find_spec("tidegate.cli", [str(tmp_path)]) is None


def test_pure_python_serves_the_same(tmp_path, monkeypatch):
    port, pod_port = free_port(), free_port("127.0.9.9")
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(http_gateway("127.0.0.1", port) + service("app", [("127.0.9.9", pod_port, "p")])
                                     + route("app", "", "- backendRefs: [{name: app, port: 80}]"))
    monkeypatch.setenv(compiled.PURE_ENV, "1")
    log = tmp_path / "tidegate.log"
    with echo_servers({("127.0.9.9", pod_port): "default/p"}, tmp_path / "echo.log"), \
            tidegate_run(config, ("127.0.0.1", port), log):
        answers = [request("127.0.0.1", port, "/")[0] for _ in range(5)]  # new, then kept connections
    assert answers == [200] * 5
    assert "hot path pure Python (TIDEGATE_PURE_PYTHON=1)" in log.read_text()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_the_installed_hot_path_is_compiled_and_fresh():
    """With a C compiler, installing tidegate (scripts/bootstrap) compiles every hot module; the suite then
    tests the compiled modules, as users run them."""
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    out = subprocess.run([*TIDEGATE, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert f"hot path compiled (Cython, {len(compiled.MODULES)} modules)" in out.stdout, (out.stdout, out.stderr,
                                                                                         sys.executable)
