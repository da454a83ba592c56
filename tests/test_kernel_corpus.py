"""Replay the recorded kernel corpus (issue 13): scenarios run once on a stock Debian
6.12 kernel under QEMU by tools/kernel_oracle, its outputs checked in, replayed here on
copyengine with plain pytest (no QEMU). Every divergence must be one the contract
chooses (compare.DELIBERATE) or one listed in known_divergences.txt; a new divergence
fails, and so does a listed one that is gone (update the list when fixing one)."""
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from kernel_oracle.compare import compare, split_output  # noqa: E402
from kernel_oracle.gen import generate, scenarios  # noqa: E402
from kernel_oracle.lang import ScenarioError, parse, renumber  # noqa: E402
from kernel_oracle.model import run_model  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "kernel_corpus"


def _known():
    lines = (CORPUS / "known_divergences.txt").read_text().splitlines()
    return {tuple(x.split("\t")[:2]) for x in lines if x.strip() and not x.startswith("#")}


def test_corpus_replays_with_only_known_divergences():
    text = (CORPUS / "scenarios.txt").read_text()
    kernel = (CORPUS / "kernel-6.12.txt").read_text()
    assert kernel.startswith("# kernel 6.12") and "# done" in kernel   # a real kernel's run
    res = compare(text, kernel, run_model(text))
    assert not res["missing"] and res["scenarios"] >= 300
    seen = {(name, key) for items in res["groups"].values() for name, key, _k, _m in items}
    known = _known()
    assert seen - known == set(), f"new divergences from the kernel: {sorted(seen - known)[:10]}"
    assert known - seen == set(), f"listed divergences that are gone (update the list): {sorted(known - seen)[:10]}"
    assert res["calls_identical"] >= 0.9 * res["calls"]


def test_kernel_output_parses_per_scenario():
    k = split_output((CORPUS / "kernel-6.12.txt").read_text())
    names = [s.name for s in parse((CORPUS / "scenarios.txt").read_text())]
    assert list(k) == names


@pytest.mark.parametrize("text,where", [
    ("scenario a\nfrob p=0\nend\n", "line 2: unknown operation 'frob'"),
    ("scenario a\nmmap p=0 r=x\nend\n", "line 2: mmap needs pages"),
    ("scenario a\nmmap p=0 r=x pages=4 colour=red\nend\n", "line 2: mmap takes no argument 'colour'"),
    ("scenario a\nmmap p=0 r=x pages=four\nend\n", "line 2: pages must be an integer"),
    ("scenario a\nmmap p=0 r=x pages=4 pages=5\nend\n", "line 2: argument 'pages' given twice"),
    ("scenario a\nmmap p=0 r=x pages\nend\n", "line 2: expected key=value"),
    ("scenario a\nmmap p=0 r=x pages=100 thp=1\nend\n", "line 2: a thp region needs a multiple of 512"),
    ("scenario a\n\n# c\nmove p=0 target=self flags=move addrs=x:0,x:1 nodes=1\nend\n",
     "line 4: addrs and nodes differ in length"),
    ("scenario a\nmove p=0 target=self flags=fast addrs=x:0 nodes=1\nend\n", "line 2: flags must be one of"),
    ("scenario a\nquery p=0 target=self addrs=x:zero\nend\n", "line 2: bad address 'x:zero'"),
    ("scenario a\nfork p=9 child=1\nend\n", "line 2: p=9 outside 0..7"),
    ("mmap p=0 r=x pages=1\n", "line 1: operation outside a scenario"),
    ("scenario a\nmmap p=0 r=x pages=1\n", "scenario 'a' has no 'end'"),
    ("scenario a\nscenario b\nend\n", "line 2: scenario inside a scenario"),
    ("end\n", "line 1: 'end' without a scenario"),
])
def test_bad_scenarios_name_the_line(text, where):
    with pytest.raises(ScenarioError) as ei:
        parse(text)
    assert where in str(ei.value)


@pytest.mark.parametrize("text,where", [
    ("scenario a\nwrite p=0 r=x page=0\nend\n", "line 2: region 'x' is unknown to process 0"),
    ("scenario a\nmmap p=0 r=x pages=2\nmunmap p=0 r=x page=1\nwrite p=0 r=x page=1\nend\n",
     "line 4: a page of 'x' is unmapped"),
    ("scenario a\nread p=1 r=x page=0\nend\n", "line 2: process 1 does not exist"),
    ("scenario a\nexit p=0\nend\n", "line 2: process 0 cannot exit"),
    ("scenario a\nfork p=0 child=1\nfork p=0 child=1\nend\n", "line 3: process slot 1 was already used"),
])
def test_scenarios_the_interpreter_refuses_name_the_line(text, where):
    with pytest.raises(ScenarioError) as ei:
        run_model(text)
    assert where in str(ei.value)


def test_generated_scenarios_roundtrip_and_run():
    sc = generate(5, 4)
    text = renumber(sc)
    assert renumber(parse(text)) == text
    out = run_model(text)
    assert out.count("\nend") + out.startswith("end") == 4


@settings(max_examples=8, deadline=None)
@given(scenarios())
def test_strategy_scenarios_are_valid_and_run(s):
    text = renumber([s])
    (parsed,) = parse(text)
    out = run_model([parsed])
    assert out.startswith(f"scenario {s.name}\n") and out.endswith("end\n")
