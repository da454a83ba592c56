"""The plugin system: built-ins, chosen plugins, entry points, allow/block lists, broken
plugins, tracing, and the engine registry."""
import textwrap

import numpy as np
import pytest

import copyengine as ce
import copyengine.testing.engines as test_engines
from copyengine.engines.base import CopyJob
from copyengine.engines.serial import SerialEngine
from copyengine.plugins import (BUILTIN_PLUGINS, ENTRY_POINT_GROUP, engine_registry,
                                get_plugin_manager, make_plugin_manager, plugin_info,
                                plugin_report)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("COPYENGINE_PLUGINS", "COPYENGINE_DISABLE_PLUGINS", "COPYENGINE_TRACE_HOOKS"):
        monkeypatch.delenv(var, raising=False)


def names(pm):
    return {name for name, _ in pm.list_name_plugin()}


def statuses(pm):
    return {p["name"]: p for p in plugin_report(pm)}


# ----------------------------------------------------------------------------- built-ins
def test_builtins_register_like_plugins():
    pm = make_plugin_manager(entry_points=False)
    assert set(BUILTIN_PLUGINS) <= names(pm)
    reg = engine_registry(pm)
    assert {"serial", "vanilla", "mt"} <= set(reg)
    assert reg["mt"].plugin == "mt" and reg["mt"].source == "built-in"
    assert reg["serial"].description
    assert all(s["status"] == "loaded" for s in plugin_report(pm))


def test_chosen_builtins_only():
    pm = make_plugin_manager(builtins=["serial"], entry_points=False)
    assert names(pm) == {"core", "serial"}          # core is always there
    assert set(engine_registry(pm)) == {"serial", "vanilla"}
    with pytest.raises(ValueError, match="unknown built-in"):
        make_plugin_manager(builtins=["nosuch"], entry_points=False)


def test_extra_plugins_in_tests():
    pm = make_plugin_manager(entry_points=False, plugins=[test_engines])
    reg = engine_registry(pm)
    assert {"nocopy", "eio", "ooo", "hang"} <= set(reg)
    assert reg["nocopy"].source == "registered"
    with ce.Machine(nodes=2, node_size="4MiB", plugin_manager=pm) as m:
        m.set_engine("nocopy")
        assert m.engine_spec == "nocopy"
    # not registered by default
    assert "nocopy" not in engine_registry(make_plugin_manager(entry_points=False))


def test_plugin_by_module_name():
    pm = make_plugin_manager(entry_points=False, plugins=["copyengine.testing.engines"])
    assert "nocopy" in engine_registry(pm)
    pm = make_plugin_manager(entry_points=False, plugins=["no_such_module_xyz"])
    assert statuses(pm)["no_such_module_xyz"]["status"] == "failed"
    assert "ModuleNotFoundError" in statuses(pm)["no_such_module_xyz"]["error"]


def test_same_plugin_twice_is_a_failure_not_a_crash():
    pm = make_plugin_manager(entry_points=False, plugins=[test_engines, test_engines])
    assert "nocopy" in engine_registry(pm)
    assert any("already registered" in f.error for f in plugin_info(pm).failures)


def test_default_manager_is_shared():
    assert get_plugin_manager() is get_plugin_manager()
    with ce.Machine(nodes=2, node_size="4MiB") as m:
        assert m.pm is get_plugin_manager()
        assert "mt" in m.engines()


# ----------------------------------------------------------------------------- env vars
def test_disable_builtin(monkeypatch):
    monkeypatch.setenv("COPYENGINE_DISABLE_PLUGINS", "mt, core,serial")
    pm = make_plugin_manager(entry_points=False)
    assert "mt" not in engine_registry(pm)
    assert {"core", "serial"} <= names(pm)          # required: cannot be disabled
    st = statuses(pm)["mt"]
    assert st["status"] == "skipped" and "COPYENGINE_DISABLE_PLUGINS" in st["error"]
    with ce.Machine(nodes=2, node_size="4MiB", plugin_manager=pm) as m:
        with pytest.raises(ValueError, match="unknown engine 'mt'"):
            m.set_engine("mt:1")


def test_trace_hooks(monkeypatch, capsys):
    monkeypatch.setenv("COPYENGINE_TRACE_HOOKS", "1")
    pm = make_plugin_manager(entry_points=False)
    engine_registry(pm)          # calls impls directly: not traced
    mem = np.zeros(8192, np.uint8)
    job = CopyJob(mem, np.array([0]), np.array([4096]), np.array([4096]), np.array([0]),
                  np.zeros(1, bool))
    with ce.Machine(nodes=2, node_size="4MiB", plugin_manager=pm) as m:
        pm.hook.copyengine_batch_copy(machine=m, engine=SerialEngine(), job=job)
    err = capsys.readouterr().err
    assert "copyengine_batch_copy" in err


# ----------------------------------------------------------------------------- entry points
PLUGIN_SRC = """
    import copyengine
    from copyengine.engines.serial import SerialEngine

    class Fancy(SerialEngine):
        pass

    @copyengine.hookimpl
    def copyengine_register_engines(register):
        register("fancy", lambda arg, machine: Fancy(), "a third-party engine")
"""


def make_dist(tmp_path, monkeypatch, dist, version, entries, modules):
    """A distribution installed on sys.path: a dist-info directory whose
    entry_points.txt importlib.metadata reads, and its modules."""
    for name, src in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(src))
    info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def fancy_dist(tmp_path, monkeypatch):
    make_dist(tmp_path, monkeypatch, "copyengine-fancy", "1.2",
              {"fancy": "ce_fancy_plugin"}, {"ce_fancy_plugin": PLUGIN_SRC})


def test_real_entry_point_is_loaded(fancy_dist):
    pm = make_plugin_manager()
    reg = engine_registry(pm)
    assert "fancy" in reg
    assert reg["fancy"].source == "copyengine-fancy 1.2"
    assert reg["fancy"].plugin == "fancy"
    with ce.Machine(nodes=2, node_size="4MiB", plugin_manager=pm) as m:
        m.set_engine("fancy")
        assert type(m.engine).__name__ == "Fancy"


def test_allow_list(fancy_dist, monkeypatch):
    monkeypatch.setenv("COPYENGINE_PLUGINS", "something_else")
    pm = make_plugin_manager()
    assert "fancy" not in engine_registry(pm)
    assert statuses(pm)["fancy"]["status"] == "skipped"
    assert "mt" in engine_registry(pm)              # built-ins are not subject to it
    monkeypatch.setenv("COPYENGINE_PLUGINS", "")
    assert "fancy" not in engine_registry(make_plugin_manager())
    monkeypatch.setenv("COPYENGINE_PLUGINS", "x,fancy")
    assert "fancy" in engine_registry(make_plugin_manager())


def test_block_list_entry_point(fancy_dist, monkeypatch):
    monkeypatch.setenv("COPYENGINE_DISABLE_PLUGINS", "fancy")
    monkeypatch.setenv("COPYENGINE_PLUGINS", "fancy")   # blocking wins
    pm = make_plugin_manager()
    assert "fancy" not in engine_registry(pm)
    assert statuses(pm)["fancy"]["status"] == "skipped"


def test_entry_points_can_be_turned_off(fancy_dist):
    assert "fancy" not in engine_registry(make_plugin_manager(entry_points=False))


def test_broken_entry_points_never_break_the_core(tmp_path, monkeypatch):
    make_dist(tmp_path, monkeypatch, "copyengine-broken", "0.1",
              {"importfail": "ce_importfail", "missing": "ce_no_such_module",
               "raising": "ce_raising", "typo": "ce_typo", "badname": "ce_badname",
               "mt": "ce_fancy2"},
              {"ce_importfail": "import no_such_dependency_xyz\n",
               "ce_raising": """
                   import copyengine
                   @copyengine.hookimpl
                   def copyengine_register_engines(register):
                       register("half", lambda a, m: None)
                       raise RuntimeError("cannot probe the device")
                   @copyengine.hookimpl
                   def copyengine_batch_copy(machine, engine, job):
                       raise AssertionError("a failed plugin's hooks must not run")
               """,
               "ce_typo": """
                   import copyengine
                   @copyengine.hookimpl
                   def copyengine_register_engine(register):
                       pass
               """,
               "ce_badname": """
                   import copyengine
                   @copyengine.hookimpl
                   def copyengine_register_engines(register):
                       register("bad:name", lambda a, m: None)
               """,
               "ce_fancy2": PLUGIN_SRC})
    pm = make_plugin_manager()
    st = statuses(pm)
    assert st["importfail"]["status"] == "failed"
    assert "no_such_dependency_xyz" in st["importfail"]["error"]
    assert st["importfail"]["source"] == "copyengine-broken 0.1"
    assert st["missing"]["status"] == "failed"
    assert st["raising"]["status"] == "failed" and "cannot probe the device" in st["raising"]["error"]
    assert st["typo"]["status"] == "failed" and "copyengine_register_engine" in st["typo"]["error"]
    assert st["badname"]["status"] == "failed" and "bad engine name" in st["badname"]["error"]
    assert st["mt"]["status"] == "failed" and "already registered" in st["mt"]["error"]
    reg = engine_registry(pm)
    assert "half" not in reg and {"serial", "vanilla", "mt"} <= set(reg)
    assert reg["mt"].source == "built-in"
    # the core still works, including the copy hook (the failed plugin's wrapper is gone)
    with ce.Machine(nodes=2, node_size="4MiB", plugin_manager=pm) as m:
        m.set_engine("mt:1")
        p = m.spawn()
        a = p.mmap(1 << 16)
        p.write(a, b"still works")
        r = p.move_pages(0, [a], [1])
        assert r.status == [1] and p.read(a, 11) == b"still works"


# ----------------------------------------------------------------------------- objects
class RaisingRegister:
    @ce.hookimpl
    def copyengine_register_engines(self, register):
        raise RuntimeError("boom")


class ClaimsSerial:
    @ce.hookimpl
    def copyengine_register_engines(self, register):
        register("serial", lambda a, m: SerialEngine(), "an impostor")
        register("mine", lambda a, m: SerialEngine())


class LateFailure:
    """Passes validation, then its register hook starts raising."""
    calls = 0

    @ce.hookimpl
    def copyengine_register_engines(self, register):
        LateFailure.calls += 1
        if LateFailure.calls > 1:
            raise OSError("device went away")
        register("late", lambda a, m: SerialEngine())


def test_raising_register_hook_is_listed_and_left_out():
    obj = RaisingRegister()
    pm = make_plugin_manager(entry_points=False, plugins=[obj])
    assert not pm.is_registered(obj)
    [f] = plugin_info(pm).failures
    assert "RuntimeError: boom" in f.error and f.source == "registered"
    assert {"serial", "mt"} <= set(engine_registry(pm))


def test_engine_name_conflict_first_wins():
    pm = make_plugin_manager(entry_points=False, plugins=[ClaimsSerial()])
    reg = engine_registry(pm)
    assert reg["serial"].plugin == "serial" and "mine" in reg
    assert any("'serial'" in c for c in plugin_info(pm).conflicts)


def test_register_hook_failing_later_is_recorded():
    LateFailure.calls = 0
    pm = make_plugin_manager(entry_points=False, plugins=[LateFailure()])
    reg = engine_registry(pm)          # second call: raises now
    assert "late" not in reg and "serial" in reg
    assert any("device went away" in f.error for f in plugin_info(pm).failures)


def test_batch_copy_wrapper_sees_every_batch():
    seen = []

    class Counter:
        @ce.hookimpl(wrapper=True)
        def copyengine_batch_copy(self, machine, engine, job):
            result = yield
            seen.append((engine.name, job.nr_folios, result.tolist()))
            return result

    pm = make_plugin_manager(entry_points=False, plugins=[Counter()])
    with ce.Machine(nodes=2, node_size="8MiB", plugin_manager=pm, engine="mt") as m:
        p = m.spawn()
        a = p.mmap(4 << 12)
        p.write(a, b"x" * (4 << 12))
        r = p.move_pages(0, [a + i * 4096 for i in range(4)], [1] * 4)
        assert r.status == [1] * 4
    assert seen and seen[0][0] == "mt" and sum(s[1] for s in seen) == 4


@pytest.mark.parametrize("bad", ["has space", "nl\n", "nul\x00", "pi|pe", "", "tab\t", "co,mma"])
def test_engine_names_docs_forbid_are_refused(bad):
    """A plugin registering a name with whitespace, control characters, NUL or '|' is
    listed as failed (issue 14), and the engine is not in the registry."""
    class Plugin:
        @ce.hookimpl
        def copyengine_register_engines(self, register):
            register(bad, lambda arg, m: None)

    plugin = Plugin()
    pm = make_plugin_manager(entry_points=False, plugins=[plugin])
    assert not pm.is_registered(plugin)
    fails = [f for f in pm.copyengine_info.failures if "bad engine name" in f.error]
    assert len(fails) == 1, pm.copyengine_info.failures
    assert bad not in engine_registry(pm)
