"""python -m kernel_oracle (run from tools/): see README.md.

    run     --seed S --count N [--kernel PKG | --vmlinuz PATH] --out DIR
            generate, boot the kernel once for all scenarios, run copyengine, compare
    compare --dir DIR       compare DIR/kernel.txt with a fresh copyengine run
    model   FILE            print copyengine's output for a scenario file
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .compare import compare, report, summary_lines
from .gen import generate
from .lang import ScenarioError, parse, renumber
from .model import run_model
from .qemu import fetch_kernel, run_kernel

DEFAULT_PACKAGE = "linux-image-6.12.115+deb12-amd64-unsigned"


def _compare_dir(d: Path) -> int:
    text = (d / "scenarios.txt").read_text()
    model = run_model(text)
    (d / "model.txt").write_text(model)
    res = compare(text, (d / "kernel.txt").read_text(), model)
    (d / "report.md").write_text(report(res, text))
    print("\n".join(summary_lines(res)))
    print(f"report: {d / 'report.md'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kernel_oracle")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, action="append", default=None)
    r.add_argument("--count", type=int, default=300)
    r.add_argument("--kernel", default=DEFAULT_PACKAGE, help="Debian package of the kernel")
    r.add_argument("--vmlinuz", type=Path, help="a kernel image already unpacked")
    r.add_argument("--scenarios", type=Path, help="run this file instead of generating")
    r.add_argument("--timeout", type=float, default=900)
    r.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("--dir", type=Path, required=True)
    m = sub.add_parser("model")
    m.add_argument("file", type=Path)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "model":
            sys.stdout.write(run_model(a.file.read_text()))
            return 0
        if a.cmd == "compare":
            return _compare_dir(a.dir)
        a.out.mkdir(parents=True, exist_ok=True)
        if a.scenarios:
            text = renumber(parse(a.scenarios.read_text()))
        else:
            text = renumber([s for seed in (a.seed or [1]) for s in generate(seed, a.count)])
        (a.out / "scenarios.txt").write_text(text)
        kernel = a.vmlinuz or fetch_kernel(a.kernel)
        t0 = time.monotonic()
        ktext = run_kernel(text, kernel, timeout=a.timeout)
        print(f"kernel run: {time.monotonic() - t0:.1f} s ({kernel.name})")
        (a.out / "kernel.txt").write_text(ktext)
        return _compare_dir(a.out)
    except ScenarioError as e:
        print(f"kernel_oracle: bad scenario: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
