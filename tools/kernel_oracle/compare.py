"""Compare the kernel's output with copyengine's, call by call, and write a report that
groups divergences, each with its smallest example. Divergences the contract chooses on
purpose are classified here, in DELIBERATE, and nowhere else."""
from __future__ import annotations

import re
from collections import defaultdict

from .lang import parse


def split_output(text: str) -> dict:
    """{scenario name: {key: line}}; key is 'call L', 'op L', 'error L' or 'final p=P r=R'."""
    out, cur = {}, None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("scenario "):
            cur = out.setdefault(line.split()[1], {})
        elif line == "end":
            cur = None
        elif cur is not None:
            w = line.split()
            key = " ".join(w[:3]) if w[0] == "final" else " ".join(w[:2])
            cur[key] = line
    return out


def _fields(line):
    return dict(w.split("=", 1) for w in line.split()[2:] if "=" in w) if line else {}


def _expand(s):
    out = []
    for item in s.split(","):
        v, _, n = item.partition("*")
        out.extend([v] * int(n or 1))
    return out


def _per_page_outcome(k, m) -> bool:
    """DESIGN.md "Per-page outcome, always": the kernel stops at the first failing batch
    and leaves later status entries unwritten (x); copyengine reports every entry. The
    written entries agree and the kernel left some unwritten."""
    if "status" not in k or "status" not in m or k["status"] == "-":
        return False
    ks, ms = _expand(k["status"]), _expand(m["status"])
    if len(ks) != len(ms) or "x" not in ks:
        return False
    # the kernel stopped early (ret > 0): copyengine may then reach a later bad node
    stopped = k.get("errno") == "0" and int(k.get("ret", "0")) > 0
    if k.get("errno") != m.get("errno") and not stopped:
        return False
    return all(a == b for a, b in zip(ks, ms) if a != "x")


# name -> (class, why, predicate over (kernel fields, model fields))
DELIBERATE = {
    "per-page outcome": ("deliberate", "shared/DESIGN.md 'Per-page outcome, always'", _per_page_outcome),
    # not a predicate over one line: compare() gives this name to every later line of a
    # scenario in which the kernel stopped a call early (pages it never moved are
    # elsewhere from then on); the report counts them apart
    "after per-page outcome": ("deliberate (consequence)", "later lines of a scenario where the "
                               "kernel stopped a move_pages call early", lambda k, m: False),
}


def classify(kline, mline):
    k, m = _fields(kline), _fields(mline)
    for name, (_cls, _why, pred) in DELIBERATE.items():
        if kline and mline and pred(k, m):
            return name
    return None


def _signature(key, kline, mline, op):
    """A group for a divergence: the operation, the field that differs, the values."""
    if not kline or not mline:
        return f"{op.name if op else key.split()[0]}: line only in {'model' if mline else 'kernel'}"
    k, m = _fields(kline), _fields(mline)
    diff = [f for f in k if k.get(f) != m.get(f)]
    if key.startswith("final"):
        ks, ms = _expand(k["status"]), _expand(m["status"])
        pairs = sorted({(a, b) for a, b in zip(ks, ms) if a != b})[:3]
        return "final node: " + ", ".join(f"kernel {a} / model {b}" for a, b in pairs)
    name = op.name if op else key.split()[0]
    if "errno" in diff or "ret" in diff and "status" not in diff:
        return f"{name}: ret/errno kernel {k.get('ret')}/{k.get('errno')} model {m.get('ret')}/{m.get('errno')}"
    if "status" in diff:
        ks, ms = _expand(k["status"]), _expand(m["status"])
        pairs = sorted({(a, b) for a, b in zip(ks, ms) if a != b})[:3]
        return f"{name} status: " + ", ".join(f"kernel {a} / model {b}" for a, b in pairs)
    return f"{name}: " + ", ".join(f"{f} kernel {k.get(f)} model {m.get(f)}" for f in diff)


def _order(key):
    """Lines in scenario order: calls and ops by line number, then the final lines."""
    w = key.split()
    return (1, 0, key) if w[0] == "final" else (0, int(w[1]), key)


def compare(scenario_text: str, kernel_text: str, model_text: str) -> dict:
    """Returns counts, groups {signature: [(scenario, key, kline, mline)]}, deliberate
    {name: count} and per-scenario identity."""
    scen = {s.name: s for s in parse(scenario_text)}
    kern, mod = split_output(kernel_text), split_output(model_text)
    res = {"calls": 0, "calls_identical": 0, "scenarios": 0, "scenarios_identical": 0,
           "groups": defaultdict(list), "deliberate": defaultdict(int), "missing": []}
    for name, s in scen.items():
        if name not in kern:
            res["missing"].append(name)
            continue
        res["scenarios"] += 1
        k, m = kern[name], mod.get(name, {})
        ops = {f"call {o.line}": o for o in s.ops}
        ops.update({f"op {o.line}": o for o in s.ops})
        same, stopped = True, False
        for key in sorted(set(k) | set(m), key=_order):
            kl, ml = k.get(key), m.get(key)
            if key.startswith("call"):
                res["calls"] += 1
                res["calls_identical"] += kl == ml
            if kl == ml:
                continue
            same = False
            d = classify(kl, ml)
            if d == "per-page outcome":
                stopped = True
            elif d is None and stopped:
                d = "after per-page outcome"
            if d:
                res["deliberate"][d] += 1
                continue
            res["groups"][_signature(key, kl, ml, ops.get(key))].append((name, key, kl, ml))
        res["scenarios_identical"] += same
    return res


def summary_lines(res) -> list[str]:
    return [f"calls compared: {res['calls']}, identical: {res['calls_identical']}",
            f"scenarios compared: {res['scenarios']}, identical end to end: {res['scenarios_identical']}",
            f"deliberate divergences: " + (", ".join(f"{n} ({c})" for n, c in res["deliberate"].items()) or "none"),
            f"other divergence groups: {len(res['groups'])}"
            f" ({sum(len(v) for v in res['groups'].values())} lines)"]


def report(res, scenario_text) -> str:
    """The report: summary, the deliberate list, and each group with its smallest example."""
    scen = {s.name: s for s in parse(scenario_text)}
    out = ["# kernel oracle report", ""] + summary_lines(res) + ["", "## deliberate (the contract chooses these)"]
    for n, (cls, why, _p) in DELIBERATE.items():
        out.append(f"- {n}: {cls}; {why}; seen {res['deliberate'].get(n, 0)} times")
    out += ["", "## divergences"]
    for sig, items in sorted(res["groups"].items(), key=lambda kv: -len(kv[1])):
        name, key, kl, ml = min(items, key=lambda it: len(scen[it[0]].ops))
        s = scen[name]
        upto = int(re.findall(r"\d+", key)[0]) if not key.startswith("final") else 10 ** 9
        out += ["", f"### {sig} ({len(items)} lines, {len({i[0] for i in items})} scenarios)",
                f"smallest example: scenario {name}, at {key}", "```"]
        out += [o.text() for o in s.ops if o.line <= upto]
        out += [f"# kernel: {kl}", f"# model:  {ml}", "```"]
    if res["missing"]:
        out += ["", f"scenarios without kernel output: {len(res['missing'])}"]
    return "\n".join(out) + "\n"
