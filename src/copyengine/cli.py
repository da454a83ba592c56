"""The ``copyengine`` command.

Subcommands live in :data:`COMMANDS`, a registry filled by the :func:`command` decorator:
each is one function that receives the parsed arguments and returns an exit status, plus
an optional function that adds its options (or one that builds its whole subparser, when
the command owns its description and epilog, as ``bench`` does). To add one::

    def _hello_args(p):
        p.add_argument("--engines", default="serial,mt")

    @command("hello", help="say hello to some engines", arguments=_hello_args)
    def cmd_hello(args) -> int:
        pm = plugin_manager(args)          # honours the global -p/--plugin options
        ...
        return 0

Conventions: bad options and arguments exit with status 2 and a one-line message (argparse
does this for the options it parses; a command raises :class:`UsageError` for what it
checks itself, e.g. an unknown engine spec); ``--json`` prints one JSON document on stdout.
Global options (before the subcommand): ``-p/--plugin MODULE`` registers an extra plugin
module (repeatable), as pytest's ``-p`` does.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable


class UsageError(Exception):
    """A bad argument found by a command: reported like argparse's errors (exit 2)."""


@dataclass
class Command:
    name: str
    run: Callable                       # run(args) -> exit status
    help: str = ""
    arguments: Callable | None = None   # arguments(parser): add the command's options
    parser: Callable | None = None      # parser(subparsers, name) -> its own subparser


#: subcommand name -> Command, in the order they were registered
COMMANDS: dict[str, Command] = {}


def command(name, help="", arguments=None, parser=None):
    """Register ``fn(args) -> int`` as subcommand ``name``; ``arguments(parser)`` adds
    its options, or ``parser(subparsers, name)`` builds the subparser itself."""
    def deco(fn):
        COMMANDS[name] = Command(name, fn, help, arguments, parser)
        return fn
    return deco


def plugin_manager(args, strict=True):
    """The plugin manager for a command: the process-wide one, or a fresh one with the
    global ``-p`` plugins registered too. ``strict``: a ``-p`` plugin that fails to load
    is a usage error (a command asked to run with it must not run without it); ``engines``
    passes False and lists it under "plugins not loaded" instead."""
    from .plugins import get_plugin_manager, make_plugin_manager, plugin_info
    extra = getattr(args, "plugin", None) or []
    if any(not name.strip() for name in extra):
        raise UsageError("-p/--plugin needs a module name, got an empty one")
    if not extra:
        return get_plugin_manager()
    pm = make_plugin_manager(plugins=extra)
    for f in plugin_info(pm).failures:
        if strict and f.name in extra:
            raise UsageError(f"plugin {f.name!r} (-p): {f.error}")
    return pm


# ----------------------------------------------------------------------------- engines
def probe_engines(pm) -> dict:
    """Every engine ``pm`` registers, each created (spec = its bare name) on a tiny
    machine to learn whether it can run here; and every plugin that failed or was skipped."""
    from . import EngineUnavailable, Machine
    from .engines.base import create_engine
    from .plugins import engine_registry, plugin_info, plugin_report

    registry = engine_registry(pm)
    rows = []
    with Machine(nodes=2, node_size="2MiB", plugin_manager=pm) as m:
        for name in sorted(registry):
            entry = registry[name]
            row = {"name": name, "plugin": entry.plugin, "source": entry.source,
                   "description": entry.description, "available": False, "error": None,
                   "capabilities": None, "details": {}}
            try:
                engine = create_engine(name, m, registry)
            except EngineUnavailable as e:
                row["error"] = str(e)
            except ValueError as e:
                row["error"] = f"needs an argument: {e}"
            except Exception as e:  # a broken factory must not hide the other engines
                row["error"] = f"{type(e).__name__}: {e}"
            else:
                try:
                    row["available"] = True
                    row["capabilities"] = engine.capabilities.as_dict()
                    row["details"] = _jsonable(engine.describe())
                except Exception as e:
                    row["available"] = False
                    row["error"] = f"{type(e).__name__}: {e}"
                finally:
                    engine.close()
            rows.append(row)
    plugins = plugin_report(pm)
    return {"engines": rows, "plugins": plugins, "conflicts": list(plugin_info(pm).conflicts)}


def _jsonable(d):
    try:
        json.dumps(d)
        return d
    except (TypeError, ValueError):
        return {str(k): str(v) for k, v in dict(d).items()}


def _value_text(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _caps_text(c) -> str:
    if c is None:
        return "-"
    parts = ["async" if c["asynchronous"] else "sync", f"threads={c['threads']}"]
    if c["channels"]:
        parts.append(f"channels={c['channels']}")
    if c["min_bytes"]:
        parts.append(f"min_bytes={c['min_bytes']}")
    if c["max_batch"]:
        parts.append(f"max_batch={c['max_batch']}")
    parts.append("mc-safe" if c["mc_safe"] else "not mc-safe")
    return " ".join(parts)


def _engines_args(p):
    p.add_argument("--json", action="store_true", help="print one JSON document")


@command("engines", help="list the copy engines, where they come from and whether they run here",
         arguments=_engines_args)
def cmd_engines(args) -> int:
    """Exit status 0, or 1 when a plugin named with ``-p`` failed to load (it is listed
    under "plugins not loaded" with its error, like any broken plugin)."""
    report = probe_engines(plugin_manager(args, strict=False))
    asked = set(getattr(args, "plugin", None) or ())
    rc = 1 if any(p["name"] in asked and p["status"] != "loaded" for p in report["plugins"]) else 0
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return rc
    rows = report["engines"]
    width = max([len(r["name"]) for r in rows] + [6])
    src_w = max([len(r["source"]) for r in rows] + [6])
    print(f"{'ENGINE':<{width}}  {'SOURCE':<{src_w}}  STATUS       CAPABILITIES")
    pad = " " * (width + 2)
    for r in rows:
        status = "available" if r["available"] else "unavailable"
        print(f"{r['name']:<{width}}  {r['source']:<{src_w}}  {status:<11}  {_caps_text(r['capabilities'])}")
        if r["error"]:
            print(f"{pad}why: {r['error']}")
        if r["details"]:
            text = " ".join(f"{k}={_value_text(v)}" for k, v in r["details"].items())
            print(textwrap.fill(text, width=100, initial_indent=pad, subsequent_indent=pad + "  ",
                                break_long_words=False, break_on_hyphens=False))
        if r["description"]:
            print(f"{pad}{r['description']}")
    bad = [p for p in report["plugins"] if p["status"] != "loaded"]
    if bad:
        print("\nplugins not loaded:")
        for p in bad:
            print(f"  {p['name']} ({p['source']}): {p['status']}: {p['error']}")
    for c in report["conflicts"]:
        print(f"\nconflict: {c}")
    return rc


# ----------------------------------------------------------------------------- bench
def _bench_parser(subparsers, name):
    from .bench import cli as bench_cli
    return bench_cli.add_parser(subparsers, name)


@command("bench", help="reproduce the seed's move_pages() throughput tables", parser=_bench_parser)
def cmd_bench(args) -> int:
    from .bench import cli as bench_cli
    args.plugin_manager = plugin_manager(args)
    return bench_cli.run(args)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="copyengine",
        description="A model of Linux page migration with pluggable copy engines.")
    parser.add_argument("--version", action="version", version=f"copyengine {__version__}")
    parser.add_argument("-p", "--plugin", action="append", metavar="MODULE", default=[],
                        help="also register this plugin module (repeatable), e.g. "
                             "copyengine.testing.engines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        if cmd.parser is not None:
            try:
                p = cmd.parser(sub, cmd.name)
            except ImportError:   # a command whose module is missing must not break the others
                continue
        else:
            p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``copyengine`` console script; returns (and exits with) the
    command's status: 0 on success, 2 for bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args._command.run(args)
    except UsageError as e:
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")
    except BrokenPipeError:   # `copyengine engines | head`
        status = 0
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
