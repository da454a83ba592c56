"""``copyengine engines``: the listing, --json, plugins given with -p, unavailable engines,
failed plugins, and usage errors (exit 2)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from copyengine import cli
from copyengine.engines.mt import max_threads

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("COPYENGINE_PLUGINS", "COPYENGINE_DISABLE_PLUGINS", "COPYENGINE_TRACE_HOOKS"):
        monkeypatch.delenv(var, raising=False)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def usage_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    _, err = capsys.readouterr()
    assert e.value.code == 2
    return err


def test_engines_table(capsys):
    rc, out, _ = run(capsys, "engines")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ENGINE", "SOURCE", "STATUS"]
    rows = {line.split()[0]: line for line in lines[1:] if line and not line.startswith(" ")}
    assert {"serial", "vanilla", "mt"} <= set(rows)
    for name in ("serial", "vanilla", "mt"):
        assert "built-in" in rows[name] and " available " in rows[name]
    assert f"sync threads={max_threads()} mc-safe" in rows["mt"]
    block = out[out.index(rows["mt"]):].split("\n")[1:3]      # details, description
    assert block[0].lstrip().startswith("threading_layer=")
    assert "copy_page_lists_mt" in block[1]
    assert "nocopy" not in rows                   # test engines are not registered by default


def test_engines_json(capsys):
    rc, out, _ = run(capsys, "engines", "--json")
    assert rc == 0
    doc = json.loads(out)
    engines = {e["name"]: e for e in doc["engines"]}
    mt = engines["mt"]
    assert mt["available"] and mt["error"] is None and mt["source"] == "built-in"
    assert mt["capabilities"]["threads"] == max_threads() and mt["capabilities"]["mc_safe"]
    assert mt["details"]["threading_layer"] == "python-threads"   # mt runs its own threads
    assert engines["serial"]["capabilities"]["asynchronous"] is False
    assert {p["name"] for p in doc["plugins"] if p["status"] == "loaded"} >= {"core", "serial", "mt"}


def test_plugin_option_adds_test_engines(capsys):
    rc, out, _ = run(capsys, "-p", "copyengine.testing.engines", "engines", "--json")
    engines = {e["name"]: e for e in json.loads(out)["engines"]}
    assert {"nocopy", "eio", "ooo", "hang"} <= set(engines)
    assert engines["nocopy"]["source"] == "registered"
    assert engines["ooo"]["capabilities"]["asynchronous"] is True
    assert engines["eio"]["capabilities"]["mc_safe"] is False


PLUGIN = """
    import copyengine
    from copyengine import EngineUnavailable

    def nodev(arg, machine):
        raise EngineUnavailable("no DMA channel on this host")

    def needs_arg(arg, machine):
        raise ValueError("gpu:DEVICE needs a device number")

    def broken(arg, machine):
        raise ZeroDivisionError("oops")

    @copyengine.hookimpl
    def copyengine_register_engines(register):
        register("nodev", nodev, "a DMA engine")
        register("gpu", needs_arg)
        register("broken", broken)
"""


def test_unavailable_engines_say_why(capsys, tmp_path, monkeypatch):
    (tmp_path / "ce_cli_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "ce_cli_broken.py").write_text("raise ImportError('missing libdma.so')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, out, _ = run(capsys, "-p", "ce_cli_plugin", "engines")
    assert rc == 0
    assert "nodev" in out and "unavailable" in out and "why: no DMA channel on this host" in out
    assert "needs an argument: gpu:DEVICE needs a device number" in out
    assert "ZeroDivisionError: oops" in out
    assert "serial" in out                      # the others are still listed
    doc = json.loads(run(capsys, "-p", "ce_cli_plugin", "engines", "--json")[1])
    nodev = next(e for e in doc["engines"] if e["name"] == "nodev")
    assert not nodev["available"] and nodev["capabilities"] is None
    # a -p module that cannot be imported: `engines` lists it as not loaded (docs/plugins.md
    # section 4) and exits 1; a command that would run with it refuses to run (exit 2)
    rc, out, _ = run(capsys, "-p", "ce_cli_broken", "engines")
    assert rc == 1
    assert "plugins not loaded" in out and "ce_cli_broken (registered): failed" in out
    assert "missing libdma.so" in out and "serial" in out
    rc, out, _ = run(capsys, "-p", "ce_cli_broken", "engines", "--json")
    assert rc == 1
    broken = [p for p in json.loads(out)["plugins"] if p["name"] == "ce_cli_broken"]
    assert broken and broken[0]["status"] == "failed" and "missing libdma.so" in broken[0]["error"]
    err = usage_error(capsys, "-p", "ce_cli_broken", "bench", "--quick")
    assert "missing libdma.so" in err


def test_typo_plugin_listed_as_not_loaded(capsys):
    rc, out, _ = run(capsys, "-p", "typo_no_such_module", "engines")
    assert rc == 1
    assert "typo_no_such_module (registered): failed: ModuleNotFoundError" in out


def test_engines_prints_no_compiler_warning(tmp_path):
    """`copyengine engines` on fresh kernel caches (so the OpenCL kernels are really
    compiled) prints nothing on stderr: no pyopencl CompilerWarning, no PoCL
    "1 warning generated."."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COPYENGINE_", "PYOPENCL_"))}
    env.update(XDG_CACHE_HOME=str(tmp_path), POCL_CACHE_DIR=str(tmp_path / "pocl"),
               PYOPENCL_COMPILER_OUTPUT="1", PYTHONWARNINGS="default")
    r = subprocess.run([sys.executable, "-m", "copyengine.cli", "engines"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    assert "warning" not in r.stdout.lower(), r.stdout


def test_failed_plugins_are_listed(capsys, monkeypatch):
    monkeypatch.setenv("COPYENGINE_DISABLE_PLUGINS", "mt")
    from copyengine import plugins
    monkeypatch.setattr(plugins, "_default", None)        # a fresh default manager
    rc, out, _ = run(capsys, "engines")
    assert "plugins not loaded" in out and "mt (built-in): skipped" in out
    assert not any(line.startswith("mt ") for line in out.splitlines())


@pytest.mark.parametrize("argv, message", [
    (["engines", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
    (["-p"], "expected one argument"),
    (["bench", "--repeat", "0"], "--repeat"),
])
def test_bad_options_exit_2(capsys, argv, message):
    assert message in usage_error(capsys, *argv)


def test_subcommands_come_from_a_registry(capsys, monkeypatch):
    assert "engines" in cli.COMMANDS
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    seen = {}

    @cli.command("hello", help="say hello", arguments=lambda p: p.add_argument("--n", type=int))
    def hello(args):
        seen["n"] = args.n
        if args.n < 0:
            raise cli.UsageError("--n must be >= 0")
        return 3

    assert run(capsys, "hello", "--n", "5")[0] == 3 and seen["n"] == 5
    assert "--n must be >= 0" in usage_error(capsys, "hello", "--n", "-1")
    assert "say hello" in run_help(capsys)


def run_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_console_script_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-m", "copyengine.cli", "engines", "--json"],
                       capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if not k.startswith("COPYENGINE_")})
    assert r.returncode == 0, r.stderr
    assert {"serial", "mt"} <= {e["name"] for e in json.loads(r.stdout)["engines"]}
    r = subprocess.run([sys.executable, "-m", "copyengine.cli", "engines", "--nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_bench_subcommand_is_wired_with_global_plugins(capsys):
    # -p reaches the bench: it knows nocopy, and its verification catches that it copies nothing
    rc = cli.main(["-p", "copyengine.testing.engines", "bench", "--quick", "--page-size", "64KiB",
                   "--counts", "2", "--configs", "serial,nocopy", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "nocopy" in out and "verification failed" in out
