"""A short tour of copyengine: a two-node machine, a process, memory, fork and
copy-on-write, move_pages (query and move), migrate_pages, and the vmstat counters.

    python examples/demo.py [ENGINE]        # ENGINE: serial (default), mt:2, pool:2, ...
"""
from __future__ import annotations

import sys

import copyengine as ce

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB


def main(engine: str = "serial") -> int:
    with ce.Machine(nodes=2, node_size="64MiB", page_size="4KiB") as m:
        m.set_engine(engine)
        print(f"machine: {m.nodes} nodes of {m.node_size // MiB} MiB, {m.page_size // KiB} KiB "
              f"pages, engine {m.engine_spec}")
        p = m.spawn(uid=1000, cap_sys_nice=True)
        print(f"process pid={p.pid} uid=1000 cap_sys_nice=True")

        # memory: 16 base pages, and one 2 MiB folio (a THP), both on node 0
        a = p.mmap(16 * PAGE, node=0)
        thp = p.mmap(2 * MiB, node=0, folio_size="2MiB")
        p.write(a, b"hello, node 0!")
        p.write(thp, b"a huge page")
        print(f"mmap: a=0x{a:x} (16 pages), thp=0x{thp:x} (2 MiB folio); "
              f"read back {p.read(a, 14)!r}")

        # move_pages with nodes=None only asks where pages are
        r = p.move_pages(0, [a, a + PAGE, thp])
        print(f"query: status={r.status}  (the node of each page)")

        # move: the THP and one base page to node 1
        r = p.move_pages(0, [a + PAGE, thp], [1, 1])
        print(f"move to node 1: ret={r.ret} status={r.status}; "
              f"now {p.move_pages(0, [a, a + PAGE, thp]).status}")
        ok = p.read(thp, 11) == b"a huge page"

        # fork: the child shares private pages copy-on-write
        c = p.fork()
        print(f"fork: child pid={c.pid} reads {c.read(a, 14)!r}")
        r = p.move_pages(0, [a, thp], [1, 0])
        print(f"move COW-shared pages with MPOL_MF_MOVE: status={r.status} (-EACCES: shared)")
        c.write(a, b"child's copy!!")            # the child's write breaks COW
        print(f"the child writes: parent reads {p.read(a, 14)!r}, child {c.read(a, 14)!r}")
        r = p.move_pages(0, [a], [1])
        print(f"move the parent's own page again: status={r.status}")
        r = p.move_pages(0, [thp], [0], flags=ce.MPOL_MF_MOVE_ALL)
        print(f"MPOL_MF_MOVE_ALL (needs cap_sys_nice) moves the shared THP: status={r.status}; "
              f"the child sees it on node {c.node_of(thp)}")
        ok &= p.node_of(a) == 1 and c.node_of(a) == 0 and p.read(a, 14) == b"hello, node 0!"

        # migrate_pages: every page of the process on node 1 goes to node 0
        left = p.migrate_pages(0, [1], [0])
        print(f"migrate_pages 1 -> 0: {left} not migrated; "
              f"now {p.move_pages(0, [a, a + PAGE, thp]).status}")
        ok &= left == 0 and p.move_pages(0, [a, a + PAGE, thp]).status == [0, 0, 0]
        ok &= p.read(a, 14) == b"hello, node 0!" and c.read(a, 14) == b"child's copy!!"
        ok &= p.read(thp, 11) == c.read(thp, 11) == b"a huge page"

        vs = m.vmstat
        keys = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success",
                "thp_migration_fail", "thp_migration_split")
        print("vmstat: " + " ".join(f"{k}={vs[k]}" for k in keys))
        c.exit()
        p.exit()
    print("contents verified" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:2]))
