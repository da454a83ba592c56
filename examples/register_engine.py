"""Register a copy engine from a few lines of code and migrate with it.

No package, no entry point: a plugin object is handed to the plugin manager directly
(how tests and experiments do it). To publish the same engine, put the hook in a module
and name it in your pyproject.toml (see docs/plugins.md).

    python examples/register_engine.py
"""
from __future__ import annotations

import numpy as np

import copyengine as ce
from copyengine.engines import Capabilities, Engine, copy_descriptors
from copyengine.plugins import engine_registry, make_plugin_manager


class CountingEngine(Engine):
    """A machine-check-safe engine that copies with NumPy and counts what it copies."""

    capabilities = Capabilities(threads=1, mc_safe=True)

    def __init__(self):
        self.batches = 0
        self.bytes = 0

    def copy(self, job):
        sel = np.flatnonzero(~job.src_poisoned[job.folio])    # never read a poisoned source
        copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes, sel)
        self.batches += 1
        self.bytes += int(job.nbytes[sel].sum())
        # one int32 per folio: 0 = copied, -EHWPOISON = poisoned source (not copied)
        return np.where(job.src_poisoned, -ce.EHWPOISON, 0).astype(np.int32)


class MyPlugin:
    """The plugin: hook implementations (any subset of copyengine.hookspecs)."""

    def __init__(self):
        self.events = []

    @ce.hookimpl
    def copyengine_register_engines(self, register):
        register("counting", lambda arg, machine: CountingEngine(),
                 "example: NumPy copy that counts batches and bytes")

    @ce.hookimpl
    def copyengine_migration_event(self, event, info):
        if event == "batch_copy":
            self.events.append((info["engine"], info["folios"], info["bytes"], info["fallback"]))


def main() -> int:
    plugin = MyPlugin()
    pm = make_plugin_manager(plugins=[plugin])
    print("engines:", ", ".join(sorted(engine_registry(pm))))

    with ce.Machine(nodes=2, node_size="32MiB", plugin_manager=pm) as m:
        m.set_engine("counting")
        p = m.spawn()
        n = 1024                                        # 4 MiB of 4 KiB pages
        a = p.mmap(n * 4096, node=0)
        thp = p.mmap(2 << 20, node=0, folio_size="2MiB")
        data = np.random.default_rng(0).integers(0, 256, n * 4096, dtype=np.uint8).tobytes()
        p.write(a, data)
        p.write(thp, data[: 2 << 20])
        m.hwpoison(p.pfn_of(a + 7 * 4096))              # one page with a memory error

        pages = [a + i * 4096 for i in range(n)] + [thp]
        r = p.move_pages(0, pages, [1] * len(pages))
        moved = sum(s == 1 for s in r.status)
        print(f"move_pages: ret={r.ret} moved={moved}/{len(pages)} "
              f"status[5:9]={r.status[5:9]} (page 7 poisoned: -EHWPOISON={-ce.EHWPOISON})")

        ok = all(p.read(a + i * 4096, 4096) == data[i * 4096:(i + 1) * 4096]
                 for i in range(n) if i != 7)
        ok &= p.read(thp, 2 << 20) == data[: 2 << 20]
        ok &= p.node_of(a) == 1 and p.node_of(thp) == 1
        eng = m.engine
        print(f"engine {eng.name}: {eng.batches} batches, {eng.bytes} bytes copied")
        for name, folios, nbytes, fallback in plugin.events:
            print(f"  batch_copy engine={name} folios={folios} bytes={nbytes} fallback={fallback}")
        vs = m.vmstat
        print(f"vmstat: pgmigrate_success={vs['pgmigrate_success']} "
              f"pgmigrate_fail={vs['pgmigrate_fail']} "
              f"thp_migration_success={vs['thp_migration_success']}")
        ok &= r.status[7] == -ce.EHWPOISON and moved == len(pages) - 1 and r.ret == 1
        ok &= eng.bytes == (n - 1) * 4096 + (2 << 20)
    print("contents verified" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
