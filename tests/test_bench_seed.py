"""The seed side by side (copyengine.bench.seed): the tables are the cover letter's, the
ratios are computed from given results, threads are capped at the machine's CPUs, and
only ratios more than 25% apart are flagged."""
import re
from pathlib import Path

import pytest

from copyengine.bench import seed

SEED_MD = Path(__file__).resolve().parents[2] / "shared" / "seed.md"


def _parse(text):
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|(.*)\|\s*$", line)
        if m:
            rows[int(m.group(1))] = tuple(float(x) for x in m.group(2).split("|"))
    return rows


@pytest.mark.skipif(not SEED_MD.exists(), reason="shared/seed.md is not beside the checkout")
def test_the_tables_are_the_cover_letters():
    text = SEED_MD.read_text()
    first, second = text.split("2MB mTHP, GB/s")
    assert _parse(first) == seed.SEED_64K
    assert _parse(second.split("## TODOs")[0]) == seed.SEED_2M


def cell(ps, count, config, gbps):
    return {"page_size": ps, "count": count, "config": config, "gbps": gbps}


def test_ratios_threads_capped_and_flags():
    # seed 64KiB x512: vanilla/mt_1 = 7.88/7.26 = 1.085, mt_2/mt_1 = 10.15/7.26 = 1.398
    results = [cell("64KiB", 512, "vanilla", 10.0), cell("64KiB", 512, "mt:1", 10.0),
               cell("64KiB", 512, "mt:2", 10.0), cell("64KiB", 512, "mt:4", 40.0)]
    out = seed.compare(results, cpus=2)
    assert [(e["ratio"], e["flagged"]) for e in out] == [("vanilla/mt_1", False), ("mt_2/mt_1", True)]
    assert out[0]["here"] == 1.0 and out[0]["seed"] == pytest.approx(7.88 / 7.26, abs=1e-3)
    assert out[1]["rel_diff"] == pytest.approx(1 / (10.15 / 7.26) - 1, rel=1e-2)
    four = seed.compare(results, cpus=4)
    assert [e["ratio"] for e in four] == ["vanilla/mt_1", "mt_2/mt_1", "mt_4/mt_1"]
    assert four[2]["here"] == 4.0 and four[2]["flagged"]  # seed: 17.53 / 7.26 = 2.41


def test_rows_the_bench_did_not_run_are_left_out_and_missing_configs_say_so():
    results = [cell("2MiB@64KiB", 1, "vanilla", 6.0), cell("2MiB@64KiB", 1, "mt:1", None)]
    out = seed.compare(results, cpus=2)
    assert {e["count"] for e in out} == {1} and all(e["here"] is None and not e["flagged"] for e in out)
    text = seed.format_comparison(out)
    assert "| 2MiB@64KiB | 1 | 2.05 / - |" in text and "0 ratios compared" in text
    assert seed.format_comparison([]) == ""
