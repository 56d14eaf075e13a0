"""protlm evaluate restarts itself under tcmalloc (protlm.cli.allocator)."""

import os
import sys

import pytest

from protlm.cli import allocator
from protlm.errors import ConfigError


class Exec(Exception):
    pass


@pytest.fixture
def execve(monkeypatch):
    calls = []

    def fake(path, args, env):
        calls.append((path, args, env))
        raise Exec

    monkeypatch.setattr(allocator.os, "execve", fake)
    monkeypatch.delenv(allocator._DONE, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    return calls


def test_choices(tmp_path, monkeypatch):
    assert allocator.find_allocator("system") is None
    lib = tmp_path / "libmymalloc.so"
    lib.write_bytes(b"")
    assert allocator.find_allocator(str(lib)) == str(lib)
    with pytest.raises(ConfigError, match="PROTLM_ALLOCATOR=.*nope.so: no such library file"):
        allocator.find_allocator(str(tmp_path / "nope.so"))
    monkeypatch.setenv("PROTLM_ALLOCATOR", "system")
    assert allocator.find_allocator() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD restart is Linux-only")
def test_restart_preloads_the_library_once(tmp_path, monkeypatch, execve):
    lib = tmp_path / "libmymalloc.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("PROTLM_ALLOCATOR", str(lib))
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    with pytest.raises(Exec):
        allocator.restart_with_allocator("evaluate", ["evaluate", "--quick"])
    path, args, env = execve[0]
    assert path == sys.executable and args == [sys.executable, "-m", "protlm.cli.main", "evaluate", "--quick"]
    assert env["LD_PRELOAD"] == f"{lib}:/opt/other.so" and env[allocator._DONE] == str(lib)
    # commands it was not measured on, an already restarted process, or "system": no restart
    allocator.restart_with_allocator("embed", ["embed"])
    monkeypatch.setenv("PROTLM_ALLOCATOR", "system")
    allocator.restart_with_allocator("evaluate", ["evaluate"])
    monkeypatch.setenv("PROTLM_ALLOCATOR", str(lib))
    monkeypatch.setenv(allocator._DONE, str(lib))
    allocator.restart_with_allocator("evaluate", ["evaluate"])
    assert len(execve) == 1


def test_calls_from_python_never_restart(execve, monkeypatch, tmp_path):
    from protlm.cli.main import main

    lib = tmp_path / "libmymalloc.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("PROTLM_ALLOCATOR", str(lib))
    assert main(["evaluate", "--no-baselines"]) == 2  # "nothing to evaluate", in this process
    assert execve == []
