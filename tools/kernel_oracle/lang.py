"""The scenario language: one operation per line, ``key=value`` arguments.

A file holds scenarios, each between ``scenario NAME`` and ``end``. ``#`` starts a
comment. Processes are numbered slots: 0 is the scenario's first process, ``fork`` makes
new ones. Regions are named; a region's address is known to the process that mapped it
and to its descendants forked later.

    mmap    p=P r=R pages=N [thp=0|1] [shared=0|1] [node=K] [populate=0|1]
    write   p=P r=R page=I [n=K]        one byte into each page (value: line number)
    read    p=P r=R page=I [n=K]
    pin     p=P r=R page=I [n=K]        long-term pin (io_uring IORING_REGISTER_BUFFERS)
    munmap  p=P r=R page=I [n=K]
    fork    p=P child=C
    exit    p=P
    move    p=P target=T flags=F addrs=A,A,.. nodes=K,K,..
    query   p=P target=T addrs=A,A,..   move_pages with nodes=NULL
    migrate p=P target=T old=K,.. new=K,..

T is a process slot, ``self`` (pid 0) or ``none`` (a pid that does not exist). F is
``move``, ``all``, ``0`` or ``bad`` (an unknown flag bit). An address A is ``R:I``
(page I of region R), ``R:I+O`` (O bytes into it) or ``bad`` (an unmapped address).
A bad line raises :class:`ScenarioError` naming it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

THP_PAGES = 512
MAX_PROCS = 8
BAD_ADDR = 4096
NO_PID = 99999
FLAGS = {"0": 0, "move": 2, "all": 4, "bad": 8}

_INT = re.compile(r"-?\d+\Z")
_NAME = re.compile(r"[a-z][a-z0-9]{0,7}\Z")
_ADDR = re.compile(r"([a-z][a-z0-9]{0,7}):(\d+)(?:\+(\d+))?\Z")

# operation: (required keys, optional keys with defaults)
OPS = {
    "mmap": (("p", "r", "pages"), {"thp": "0", "shared": "0", "node": "0", "populate": "0"}),
    "write": (("p", "r", "page"), {"n": "1"}),
    "read": (("p", "r", "page"), {"n": "1"}),
    "pin": (("p", "r", "page"), {"n": "1"}),
    "munmap": (("p", "r", "page"), {"n": "1"}),
    "fork": (("p", "child"), {}),
    "exit": (("p",), {}),
    "move": (("p", "target", "flags", "addrs", "nodes"), {}),
    "query": (("p", "target", "addrs"), {}),
    "migrate": (("p", "target", "old", "new"), {}),
}
CALLS = ("move", "query", "migrate")


class ScenarioError(ValueError):
    """A malformed scenario; the message names the line."""


@dataclass
class Op:
    line: int
    name: str
    args: dict

    def text(self) -> str:
        return " ".join([self.name] + [f"{k}={v}" for k, v in self.args.items()])


@dataclass
class Scenario:
    name: str
    ops: list = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([f"scenario {self.name}"] + [o.text() for o in self.ops] + ["end"]) + "\n"


def _fail(lineno, line, why):
    raise ScenarioError(f"line {lineno}: {why}: {line.strip()!r}")


def _int(v, lineno, line, what, lo=None, hi=None):
    if not _INT.match(v):
        _fail(lineno, line, f"{what} must be an integer, got {v!r}")
    n = int(v)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        _fail(lineno, line, f"{what}={n} outside {lo}..{hi}")
    return n


def _check(op, lineno, line):
    a = op.args
    slot = lambda k: _int(a[k], lineno, line, k, 0, MAX_PROCS - 1)  # noqa: E731
    slot("p")
    if "r" in a and not _NAME.match(a["r"]):
        _fail(lineno, line, f"bad region name {a['r']!r}")
    for k in ("pages", "n"):
        if k in a:
            _int(a[k], lineno, line, k, 1, 4 * THP_PAGES)
    if "page" in a:
        _int(a["page"], lineno, line, "page", 0, 4 * THP_PAGES)
    for k in ("thp", "shared", "populate"):
        if k in a:
            _int(a[k], lineno, line, k, 0, 1)
    if "node" in a:
        _int(a["node"], lineno, line, "node", 0, 63)
    if op.name == "mmap" and a["thp"] == "1" and int(a["pages"]) % THP_PAGES:
        _fail(lineno, line, f"a thp region needs a multiple of {THP_PAGES} pages")
    if "child" in a:
        slot("child")
    if "target" in a and a["target"] not in ("self", "none"):
        slot("target")
    if "flags" in a and a["flags"] not in FLAGS:
        _fail(lineno, line, f"flags must be one of {', '.join(FLAGS)}")
    if "addrs" in a:
        addrs = a["addrs"].split(",")
        for x in addrs:
            if x != "bad" and not _ADDR.match(x):
                _fail(lineno, line, f"bad address {x!r}")
        if "nodes" in a:
            nodes = a["nodes"].split(",")
            for x in nodes:
                _int(x, lineno, line, "node", -1, 1023)
            if len(nodes) != len(addrs):
                _fail(lineno, line, "addrs and nodes differ in length")
    for k in ("old", "new"):
        if k in a:
            for x in a[k].split(","):
                _int(x, lineno, line, k, 0, 63)


def parse(text: str) -> list[Scenario]:
    """Parse scenario text; raise ScenarioError naming the first bad line."""
    out, cur = [], None
    for lineno, line in enumerate(text.splitlines(), 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        words = body.split()
        if words[0] == "scenario":
            if cur is not None:
                _fail(lineno, line, "scenario inside a scenario (missing end)")
            if len(words) != 2 or not re.match(r"[A-Za-z0-9_.-]{1,64}\Z", words[1]):
                _fail(lineno, line, "expected 'scenario NAME'")
            cur = Scenario(words[1])
            continue
        if words[0] == "end":
            if cur is None or len(words) != 1:
                _fail(lineno, line, "'end' without a scenario")
            out.append(cur)
            cur = None
            continue
        if cur is None:
            _fail(lineno, line, "operation outside a scenario")
        name = words[0]
        if name not in OPS:
            _fail(lineno, line, f"unknown operation {name!r}")
        need, opt = OPS[name]
        args = {}
        for w in words[1:]:
            k, eq, v = w.partition("=")
            if not eq or not v:
                _fail(lineno, line, f"expected key=value, got {w!r}")
            if k not in need and k not in opt:
                _fail(lineno, line, f"{name} takes no argument {k!r}")
            if k in args:
                _fail(lineno, line, f"argument {k!r} given twice")
            args[k] = v
        missing = [k for k in need if k not in args]
        if missing:
            _fail(lineno, line, f"{name} needs {', '.join(missing)}")
        full = {k: args[k] for k in need}
        full.update({k: args.get(k, d) for k, d in opt.items()})
        op = Op(lineno, name, full)
        _check(op, lineno, line)
        cur.ops.append(op)
    if cur is not None:
        raise ScenarioError(f"line {len(text.splitlines())}: scenario {cur.name!r} has no 'end'")
    return out


def renumber(scenarios) -> str:
    """The text of scenarios, and each op's ``line`` set to its line in that text."""
    lines = []
    for s in scenarios:
        lines.append(f"scenario {s.name}")
        for o in s.ops:
            lines.append(o.text())
            o.line = len(lines)
        lines.append("end")
    return "\n".join(lines) + "\n"
