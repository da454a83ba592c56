"""The example scripts run and say what they should."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script, *args):
    env = dict(os.environ)
    env.pop("COPYENGINE_TRACE_HOOKS", None)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_register_engine_example():
    out = run("register_engine.py")
    assert "counting" in out.splitlines()[0]                      # registered
    assert "move_pages: ret=1 moved=1024/1025" in out
    assert "status[5:9]=[1, 1, -133, 1]" in out                   # -EHWPOISON for page 7
    assert "engine counting: 3 batches" in out
    assert "batch_copy engine=counting folios=512" in out
    assert "pgmigrate_success=1535 pgmigrate_fail=1 thp_migration_success=1" in out
    assert out.rstrip().endswith("contents verified")


HAVE_POOL = importlib.util.find_spec("copyengine_threadpool") is not None


@pytest.mark.parametrize("engine", [None, "vanilla", pytest.param("pool:1", marks=pytest.mark.skipif(
    not HAVE_POOL, reason="pip install -e plugins/copyengine-threadpool"))])
def test_demo_example(engine):
    out = run("demo.py", *([engine] if engine else []))
    assert f"engine {engine or 'serial'}" in out
    assert "query: status=[0, 0, 0]" in out
    assert "move to node 1: ret=0 status=[1, 1]; now [0, 1, 1]" in out
    assert "MPOL_MF_MOVE: status=[-13, -13]" in out
    assert "child b\"child's copy!!\"" in out
    assert "moves the shared THP: status=[0]; the child sees it on node 0" in out
    assert "migrate_pages 1 -> 0: 0 not migrated; now [0, 0, 0]" in out
    assert "pgmigrate_success=1028 pgmigrate_fail=0 thp_migration_success=2" in out
    assert out.rstrip().endswith("contents verified")
