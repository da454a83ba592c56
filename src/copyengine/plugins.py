"""The plugin manager: built-in plugins, third-party entry points, and the engine registry.

Built-ins register exactly like third-party plugins. Environment variables:

``COPYENGINE_PLUGINS``
    comma-separated allow-list of third-party plugin (entry point) names to load;
    unset loads every installed one, an empty string loads none.
``COPYENGINE_DISABLE_PLUGINS``
    comma-separated names of plugins (built-in modules or entry points) never to load.
``COPYENGINE_TRACE_HOOKS``
    set to 1 to print every hook call and result to stderr (pluggy's tracing).
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

ENTRY_POINT_GROUP = "copyengine"

#: Built-in plugin modules, registered under their short names.
BUILTIN_PLUGINS = {
    "core": "copyengine.core_plugin",
    "serial": "copyengine.engines.serial",
}


@dataclass
class EngineEntry:
    name: str
    factory: Callable
    description: str = ""
    plugin: str = ""       # plugin name that registered it
    source: str = "built-in"  # "built-in" or the distribution it came from


@dataclass
class PluginFailure:
    name: str
    source: str
    error: str


@dataclass
class PluginInfo:
    manager: pluggy.PluginManager
    sources: dict = field(default_factory=dict)   # plugin name -> "built-in" / distribution
    failures: list = field(default_factory=list)  # PluginFailure


def _names(var):
    val = os.environ.get(var)
    if val is None:
        return None
    return {n.strip() for n in val.split(",") if n.strip()}


def make_plugin_manager(builtins=True, entry_points=True, plugins=()) -> pluggy.PluginManager:
    """A fresh manager. ``builtins``: True, False or an iterable of built-in names;
    ``entry_points``: load installed third-party plugins; ``plugins``: extra plugin
    objects (modules, classes, instances) to register, e.g. in tests."""
    pm = pluggy.PluginManager("copyengine")
    pm.add_hookspecs(hookspecs)
    info = PluginInfo(pm)
    pm.copyengine_info = info
    blocked = _names("COPYENGINE_DISABLE_PLUGINS") or set()
    wanted = BUILTIN_PLUGINS if builtins is True else ({} if not builtins else
                                                       {n: BUILTIN_PLUGINS[n] for n in builtins})
    for name, modname in wanted.items():
        if name in blocked and name != "core":
            continue
        try:
            pm.register(importlib.import_module(modname), name=name)
            info.sources[name] = "built-in"
        except Exception as e:  # a broken built-in must not take the core down with it
            info.failures.append(PluginFailure(name, "built-in", f"{type(e).__name__}: {e}"))
    if entry_points:
        allow = _names("COPYENGINE_PLUGINS")
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or (allow is not None and ep.name not in allow):
                continue
            dist = getattr(ep, "dist", None)
            source = f"{dist.name} {dist.version}" if dist is not None else ep.value
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                pm.register(ep.load(), name=ep.name)
                info.sources[ep.name] = source
            except Exception as e:
                info.failures.append(PluginFailure(ep.name, source, f"{type(e).__name__}: {e}"))
    for p in plugins:
        name = pm.register(p)
        info.sources[name] = "registered"
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


def engine_registry(pm: pluggy.PluginManager) -> dict[str, EngineEntry]:
    """Every engine the plugins of ``pm`` register, by name. A plugin whose
    registration hook raises is recorded as a failure and contributes nothing."""
    info = getattr(pm, "copyengine_info", None)
    out: dict[str, EngineEntry] = {}
    for impl in pm.hook.copyengine_register_engines.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or "?"
        found = []

        def register(name, factory, description="", _found=found):
            if not isinstance(name, str) or not name or ":" in name or "," in name:
                raise ValueError(f"bad engine name {name!r}: a non-empty string without ':' or ','")
            _found.append((name, factory, description))

        try:
            impl.function(register=register)
        except Exception as e:
            if info is not None and not any(f.name == plugin_name for f in info.failures):
                info.failures.append(PluginFailure(plugin_name, info.sources.get(plugin_name, "?"),
                                                   f"{type(e).__name__}: {e}"))
            continue
        source = info.sources.get(plugin_name, "registered") if info else "registered"
        for name, factory, description in found:
            out.setdefault(name, EngineEntry(name, factory, description, plugin_name, source))
    return out
