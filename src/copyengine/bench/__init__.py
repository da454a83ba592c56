"""copyengine bench: the seed's move_pages() throughput tables, reproduced and explained.

>>> from copyengine.bench import run_bench, format_report
>>> res = run_bench(page_sizes="2MiB@64KiB", counts=[1, 8], configs=["serial", "mt:2"],
...                 repeat=3)                                     # doctest: +SKIP
>>> print(format_report(res))                                     # doctest: +SKIP

The command line is ``copyengine bench`` (or ``python -m copyengine.bench``); see
``bench/README.md`` for how to read the results against the seed's tables.
"""
from .report import format_report, format_tables, write_csv, write_json, write_markdown, write_plot
from .runner import PHASES, SCHEMA, TARGETS, BenchError, evaluate_targets, make_plan, run_bench
from .scenarios import (DEFAULT_COUNTS, DEFAULT_PAGE_SIZES, QUICK_COUNTS, PageSize, default_configs,
                        parse_page_size)
from .sysinfo import machine_info, measure_ceiling

__all__ = ["run_bench", "make_plan", "BenchError", "PHASES", "SCHEMA", "TARGETS", "evaluate_targets",
           "format_report", "format_tables", "write_json", "write_csv", "write_markdown", "write_plot",
           "PageSize", "parse_page_size", "default_configs", "DEFAULT_PAGE_SIZES", "DEFAULT_COUNTS",
           "QUICK_COUNTS", "machine_info", "measure_ceiling"]
