"""The plugin manager: built-in plugins, third-party entry points, and the engine registry.

Built-ins register exactly like third-party plugins: each is a module with
``@copyengine.hookimpl`` functions (see :mod:`copyengine.hookspecs`), registered under a
short name. Third-party packages declare theirs in the entry-point group ``copyengine``::

    [project.entry-points.copyengine]
    mydma = "mydma.plugin"          # a module (or any object) with hook implementations

A plugin that cannot be imported, fails pluggy's validation, implements a hook that does
not exist (a typo like ``copyengine_register_engine``), or whose
``copyengine_register_engines`` raises or registers a name
:func:`copyengine.hookcheck.check_engine_name` refuses (whitespace, control characters,
``,`` ``:`` ``|``) is left out: it is listed in
:func:`plugin_report` as failed, with its error, and never breaks the core.

Environment variables (read when a manager is made):

``COPYENGINE_PLUGINS``
    comma-separated allow-list of third-party plugin (entry point) names to load;
    unset loads every installed one, an empty string loads none.
``COPYENGINE_DISABLE_PLUGINS``
    comma-separated names of plugins (built-in short names like ``mt``, or entry point
    names) never to load. ``core`` and ``serial`` are required and cannot be disabled.
``COPYENGINE_TRACE_HOOKS``
    set to 1 to print every hook call and its result to stderr (pluggy's tracing).
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

import pluggy

from . import hookspecs

PROJECT = "copyengine"
ENTRY_POINT_GROUP = "copyengine"

#: Built-in plugin modules, registered under their short names, in this order.
BUILTIN_PLUGINS = {
    "core": "copyengine.core_plugin",
    "serial": "copyengine.engines.serial",
    "mt": "copyengine.engines.mt",
    "opencl": "copyengine.engines.opencl",
    "auto": "copyengine.engines.auto",
}

#: Built-ins the framework cannot run without: COPYENGINE_DISABLE_PLUGINS ignores them.
REQUIRED_PLUGINS = frozenset({"core", "serial"})


@dataclass
class EngineEntry:
    name: str
    factory: Callable
    description: str = ""
    plugin: str = ""          # plugin name that registered it
    source: str = "built-in"  # "built-in", "registered", or "<distribution> <version>"


@dataclass
class PluginFailure:
    name: str
    source: str
    error: str


@dataclass
class PluginInfo:
    """What a manager loaded, skipped and failed to load (``pm.copyengine_info``)."""
    manager: pluggy.PluginManager
    sources: dict = field(default_factory=dict)    # plugin name -> where it came from
    failures: list = field(default_factory=list)   # PluginFailure: import/registration errors
    skipped: list = field(default_factory=list)    # PluginFailure: blocked or not allowed
    conflicts: list = field(default_factory=list)  # str: engine names registered twice

    def fail(self, name, source, error):
        if not any(f.name == name for f in self.failures):
            self.failures.append(PluginFailure(name, source, error))


def _names(var):
    val = os.environ.get(var)
    if val is None:
        return None
    return {n.strip() for n in val.split(",") if n.strip()}


def _describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _collect(impl, register):
    """Call one plugin's copyengine_register_engines implementation."""
    args = {"register": register}
    impl.function(*[args[a] for a in impl.argnames])


def _checked_register(name, factory, description="", *, _into):
    from .hookcheck import check_engine_name  # late: hookcheck imports the engines package
    check_engine_name(name)
    if not callable(factory):
        raise TypeError(f"engine {name!r}: factory {factory!r} is not callable")
    _into.append((name, factory, str(description)))


def _validate(pm: pluggy.PluginManager, plugin) -> None:
    """Raise if ``plugin`` implements unknown hooks or its engine registration fails."""
    for caller in pm.get_hookcallers(plugin) or ():
        if not caller.has_spec():
            impls = [i for i in caller.get_hookimpls() if i.plugin is plugin]
            if any(not i.optionalhook for i in impls):
                raise pluggy.PluginValidationError(
                    plugin, f"unknown hook {caller.name!r} (not in copyengine.hookspecs; a typo?)")
    for impl in pm.hook.copyengine_register_engines.get_hookimpls():
        if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
            found = []
            _collect(impl, lambda *a, **k: _checked_register(*a, **k, _into=found))


def _try_register(pm, info, obj, name, source) -> bool:
    """Register and validate one plugin; on any error leave it out and record why."""
    label = name or pm.get_canonical_name(obj)
    if pm.is_registered(obj):
        info.fail(label, source, f"already registered as {pm.get_name(obj)!r}")
        return False
    try:
        registered = pm.register(obj, name=name)
    except Exception as e:
        info.fail(label, source, _describe_error(e))
        return False
    if registered is None:
        info.skipped.append(PluginFailure(label, source, "blocked"))
        return False
    try:
        _validate(pm, obj)
    except Exception as e:
        pm.unregister(obj)
        info.fail(registered, source, _describe_error(e))
        return False
    info.sources[registered] = source
    return True


def _dist_label(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else ep.value


def make_plugin_manager(builtins=True, entry_points=True, plugins=()) -> pluggy.PluginManager:
    """A fresh manager.

    ``builtins``: True (all), False (none but ``core``) or an iterable of built-in short
    names (``core`` is always added); ``entry_points``: load installed third-party plugins
    (subject to the environment variables); ``plugins``: extra plugins to register, e.g.
    in tests: modules, classes or instances, or dotted module names to import (like
    pytest's ``-p``). Every plugin that fails is listed in ``pm.copyengine_info.failures``.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    info = PluginInfo(pm)
    pm.copyengine_info = info
    blocked = (_names("COPYENGINE_DISABLE_PLUGINS") or set()) - REQUIRED_PLUGINS

    if builtins is True:
        wanted = list(BUILTIN_PLUGINS)
    else:
        wanted = ["core"] + [n for n in (builtins or ()) if n != "core"]
        unknown = [n for n in wanted if n not in BUILTIN_PLUGINS]
        if unknown:
            raise ValueError(f"unknown built-in plugin(s) {unknown}; known: {', '.join(BUILTIN_PLUGINS)}")
    for name in wanted:
        if name in blocked:
            info.skipped.append(PluginFailure(name, "built-in", "disabled by COPYENGINE_DISABLE_PLUGINS"))
            continue
        try:
            module = importlib.import_module(BUILTIN_PLUGINS[name])
        except Exception as e:  # a broken built-in must not take the core down with it
            info.fail(name, "built-in", _describe_error(e))
            continue
        _try_register(pm, info, module, name, "built-in")

    if entry_points:
        allow = _names("COPYENGINE_PLUGINS")
        try:
            eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
        except Exception as e:  # a broken installed distribution's metadata
            eps = []
            info.fail("<entry points>", ENTRY_POINT_GROUP, _describe_error(e))
        seen = set()
        for ep in eps:
            if ep.name in seen:   # the same distribution found twice on sys.path
                continue
            seen.add(ep.name)
            source = _dist_label(ep)
            if ep.name in blocked:
                info.skipped.append(PluginFailure(ep.name, source, "disabled by COPYENGINE_DISABLE_PLUGINS"))
                continue
            if allow is not None and ep.name not in allow:
                info.skipped.append(PluginFailure(ep.name, source, "not in COPYENGINE_PLUGINS"))
                continue
            if pm.has_plugin(ep.name) or ep.name in BUILTIN_PLUGINS:
                info.fail(ep.name, source, f"a plugin named {ep.name!r} is already registered "
                                           f"({info.sources.get(ep.name, 'built-in')})")
                continue
            try:
                obj = ep.load()
            except Exception as e:
                info.fail(ep.name, source, _describe_error(e))
                continue
            _try_register(pm, info, obj, ep.name, source)

    for p in plugins:
        if isinstance(p, str):
            try:
                obj = importlib.import_module(p)
            except Exception as e:
                info.fail(p, "registered", _describe_error(e))
                continue
            _try_register(pm, info, obj, p, "registered")
        else:
            _try_register(pm, info, p, None, "registered")

    if os.environ.get("COPYENGINE_TRACE_HOOKS", "") not in ("", "0"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


_default = None
_default_lock = threading.Lock()


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager every Machine uses unless given its own."""
    global _default
    with _default_lock:
        if _default is None:
            _default = make_plugin_manager()
        return _default


def plugin_info(pm: pluggy.PluginManager) -> PluginInfo:
    """The load record of ``pm`` (an empty one for a manager not made here)."""
    info = getattr(pm, "copyengine_info", None)
    if info is None:
        info = pm.copyengine_info = PluginInfo(pm)
        for name, _ in pm.list_name_plugin():
            info.sources[name] = "registered"
    return info


def plugin_report(pm: pluggy.PluginManager) -> list[dict]:
    """Every plugin ``pm`` knows of: ``name``, ``source``, ``status`` ("loaded", "failed"
    or "skipped") and ``error`` (why it failed or was skipped; None when loaded)."""
    info = plugin_info(pm)
    out = [{"name": name, "source": info.sources.get(name, "registered"), "status": "loaded",
            "error": None} for name, _ in pm.list_name_plugin() if name is not None]
    out += [{"name": f.name, "source": f.source, "status": "failed", "error": f.error}
            for f in info.failures]
    out += [{"name": f.name, "source": f.source, "status": "skipped", "error": f.error}
            for f in info.skipped]
    return out


def engine_registry(pm: pluggy.PluginManager) -> dict[str, EngineEntry]:
    """Every engine the plugins of ``pm`` register, by name. The first plugin registered
    wins a name (built-ins come first); later claims are recorded as conflicts. A plugin
    whose registration hook raises is recorded as a failure and contributes nothing."""
    info = plugin_info(pm)
    out: dict[str, EngineEntry] = {}
    for impl in pm.hook.copyengine_register_engines.get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue
        plugin_name = pm.get_name(impl.plugin) or "?"
        source = info.sources.get(plugin_name, "registered")
        found = []
        try:
            _collect(impl, lambda *a, **k: _checked_register(*a, **k, _into=found))
        except Exception as e:
            info.fail(plugin_name, source, _describe_error(e))
            continue
        for name, factory, description in found:
            if name in out:
                msg = (f"engine {name!r} of plugin {plugin_name!r} ignored: "
                       f"plugin {out[name].plugin!r} registered it first")
                if msg not in info.conflicts:
                    info.conflicts.append(msg)
                continue
            out[name] = EngineEntry(name, factory, description, plugin_name, source)
    return out
