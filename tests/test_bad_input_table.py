"""Bad input everywhere, table-driven: every public entry point and CLI command, with
wrong types, negative and huge sizes, unknown pids and nodes, bad engine specs, settings
and options. Each gets the contract's error -- OSError with Linux's errno for calls
shaped like system calls, ValueError/TypeError for constructors, engine specs and
settings, exit status 2 with a one-line message for the CLI -- and the machine is checked
unchanged afterwards (testing.invariants.snapshot), consistent (check_machine), and still
working.
"""
import contextlib
import errno
import io

import numpy as np
import pytest

import copyengine as ce
from copyengine.testing.invariants import assert_unchanged, check_machine, snapshot

PS = 4096
KiB, MiB = 1 << 10, 1 << 20
EINVAL, EFAULT, ENOENT, ENOMEM, ESRCH, EPERM, ENODEV, EACCES = (
    errno.EINVAL, errno.EFAULT, errno.ENOENT, errno.ENOMEM, errno.ESRCH, errno.EPERM, errno.ENODEV,
    errno.EACCES)
EHWPOISON = ce.EHWPOISON
BIG = 1 << 70            # beyond any int64
HUGE = 1 << 50           # beyond the 128 TiB address space


class World:
    """A small machine in a varied state: private, lazily touched, shared and 2 MiB
    mappings, a forked child with a COW-broken page, a pin, a hole, a poisoned page, a
    process restricted to node 1, one of another uid, one that exited."""

    def __init__(self):
        m = self.m = ce.Machine(nodes=2, node_size="4MiB")
        p = self.p = m.spawn(uid=1000)
        self.priv = p.mmap(8 * PS)
        p.write(self.priv, bytes(range(256)) * (8 * PS // 256))
        self.lazy = p.mmap(8 * PS, node=1, populate=False)
        p.write(self.lazy + 100, b"lazy")
        p.read(self.lazy + 2 * PS, 1)                  # the zero page
        self.shared = p.mmap(4 * PS, node=1, shared=True)
        p.write(self.shared, b"shared!")
        self.big = p.mmap(2 * MiB, node=0, folio_size="2MiB")
        p.write(self.big + 12345, b"big folio")
        self.c = p.fork()
        self.c.write(self.priv + PS, b"child wrote")
        self.pin = p.pin(self.priv + 4 * PS, PS)
        self.hole = self.priv + 6 * PS
        p.munmap(self.hole, PS)
        m.hwpoison(p.pfn_of(self.priv + 7 * PS))
        self.other = m.spawn(uid=2000)
        self.other_a = self.other.mmap(PS)
        self.only1 = m.spawn(uid=1000, mems_allowed=[1])
        self.dead = m.spawn()
        self.dead_a = self.dead.mmap(PS)
        self.dead.exit()
        self.dead_pin = self.p.pin(self.priv, PS)
        self.dead_pin.release()

    def still_works(self):
        p, c = self.p, self.c
        assert p.read(self.shared, 7) == b"shared!" == c.read(self.shared, 7)
        assert c.read(self.priv + PS, 11) == b"child wrote"
        assert p.read(self.big + 12345, 9) == b"big folio"
        assert p.read(self.lazy + 100, 4) == b"lazy"
        r = p.move_pages(0, [self.priv], [1])
        assert r.status == [1] and p.read(self.priv, 4) == bytes(range(4))
        check_machine(self.m)


@pytest.fixture
def world():
    w = World()
    yield w
    w.m.close()


def expect(w, call, exc, code, ignore=()):
    s0 = snapshot(w.m)
    with pytest.raises(exc) as ei:
        call(w)
    e = ei.value
    if code is not None:
        assert isinstance(e, OSError), f"{type(e).__name__}: {e}"
        assert e.errno == code, f"expected errno {errno.errorcode.get(code, code)}, got {e.errno}: {e}"
    else:
        assert not isinstance(e, OSError) or exc is OSError, f"{type(e).__name__}: {e}"
    assert str(e), "an error without a message"
    assert_unchanged(s0, snapshot(w.m), ignore=ignore)
    check_machine(w.m)
    return e


# ----------------------------------------------------------------------------- the machine's calls
# (label, call(world), exception, errno or None, snapshot keys a failing call may change)
ENOMEM_IGNORE = ("mem_map_free", "mmap_base")   # an undone allocation's stale free-frame fields
CASES = [
    # set_engine
    ("set_engine unknown", lambda w: w.m.set_engine("warp-drive"), ValueError, None, ()),
    ("set_engine empty", lambda w: w.m.set_engine(""), ValueError, None, ()),
    ("set_engine empty arg", lambda w: w.m.set_engine("mt:"), ValueError, None, ()),
    ("set_engine comma", lambda w: w.m.set_engine("serial,mt"), ValueError, None, ()),
    ("set_engine spaces", lambda w: w.m.set_engine(" serial"), ValueError, None, ()),
    ("set_engine mt zero", lambda w: w.m.set_engine("mt:0"), ValueError, None, ()),
    ("set_engine mt negative", lambda w: w.m.set_engine("mt:-2"), ValueError, None, ()),
    ("set_engine mt junk", lambda w: w.m.set_engine("mt:lots"), ValueError, None, ()),
    ("set_engine mt huge", lambda w: w.m.set_engine(f"mt:{BIG}"), ValueError, None, ()),
    ("set_engine serial arg", lambda w: w.m.set_engine("serial:2"), ValueError, None, ()),
    ("set_engine vanilla arg", lambda w: w.m.set_engine("vanilla:x"), ValueError, None, ()),
    ("set_engine int", lambda w: w.m.set_engine(3), TypeError, None, ()),
    ("set_engine None", lambda w: w.m.set_engine(None), TypeError, None, ()),
    ("set_engine bytes", lambda w: w.m.set_engine(b"serial"), TypeError, None, ()),
    # settings
    ("setting unknown", lambda w: w.m.settings.__setitem__("bogus", 1), ValueError, None, ()),
    ("setting unknown attr", lambda w: setattr(w.m.settings, "bogus", 1), ValueError, None, ()),
    ("setting name type", lambda w: w.m.settings.__setitem__(1, 1), TypeError, None, ()),
    ("setting read unknown", lambda w: w.m.settings["bogus"], ValueError, None, ()),
    ("batch zero", lambda w: w.m.settings.__setitem__("nr_max_batched_migration", 0), ValueError, None, ()),
    ("batch negative", lambda w: w.m.settings.__setitem__("nr_max_batched_migration", -1), ValueError, None, ()),
    ("batch huge", lambda w: w.m.settings.__setitem__("nr_max_batched_migration", BIG), ValueError, None, ()),
    ("batch str", lambda w: w.m.settings.__setitem__("nr_max_batched_migration", "512"), TypeError, None, ()),
    ("batch float", lambda w: w.m.settings.__setitem__("nr_max_batched_migration", 512.0), TypeError, None, ()),
    ("batch bool", lambda w: w.m.settings.__setitem__("nr_max_batched_migration", True), TypeError, None, ()),
    ("mode unknown", lambda w: w.m.settings.__setitem__("migrate_mode", "fast"), ValueError, None, ()),
    ("mode case", lambda w: w.m.settings.__setitem__("migrate_mode", "SYNC"), ValueError, None, ()),
    ("mode type", lambda w: w.m.settings.__setitem__("migrate_mode", 1), TypeError, None, ()),
    ("mode None", lambda w: w.m.settings.__setitem__("migrate_mode", None), TypeError, None, ()),
    ("timeout zero", lambda w: w.m.settings.__setitem__("copy_timeout", 0), ValueError, None, ()),
    ("timeout negative", lambda w: w.m.settings.__setitem__("copy_timeout", -1.0), ValueError, None, ()),
    ("timeout huge", lambda w: w.m.settings.__setitem__("copy_timeout", 1e9), ValueError, None, ()),
    ("timeout nan", lambda w: w.m.settings.__setitem__("copy_timeout", float("nan")), ValueError, None, ()),
    ("timeout inf", lambda w: w.m.settings.__setitem__("migration_wait_timeout", float("inf")), ValueError,
     None, ()),
    ("timeout str", lambda w: w.m.settings.__setitem__("copy_timeout", "1"), TypeError, None, ()),
    ("timeout bool", lambda w: w.m.settings.__setitem__("migration_wait_timeout", True), TypeError, None, ()),
    # spawn
    ("spawn uid negative", lambda w: w.m.spawn(uid=-1), ValueError, None, ()),
    ("spawn uid str", lambda w: w.m.spawn(uid="0"), TypeError, None, ()),
    ("spawn uid float", lambda w: w.m.spawn(uid=0.0), TypeError, None, ()),
    ("spawn uid bool", lambda w: w.m.spawn(uid=True), TypeError, None, ()),
    ("spawn cap int", lambda w: w.m.spawn(cap_sys_nice=1), TypeError, None, ()),
    ("spawn cap str", lambda w: w.m.spawn(cap_sys_nice="yes"), TypeError, None, ()),
    ("spawn mems empty", lambda w: w.m.spawn(mems_allowed=[]), ValueError, None, ()),
    ("spawn mems unknown", lambda w: w.m.spawn(mems_allowed=[0, 2]), ValueError, None, ()),
    ("spawn mems negative", lambda w: w.m.spawn(mems_allowed=[-1]), ValueError, None, ()),
    ("spawn mems huge", lambda w: w.m.spawn(mems_allowed=[BIG]), ValueError, None, ()),
    ("spawn mems str", lambda w: w.m.spawn(mems_allowed="01"), TypeError, None, ()),
    ("spawn mems int", lambda w: w.m.spawn(mems_allowed=1), TypeError, None, ()),
    ("spawn mems str items", lambda w: w.m.spawn(mems_allowed=["0"]), TypeError, None, ()),
    ("spawn mems bool items", lambda w: w.m.spawn(mems_allowed=[True]), TypeError, None, ()),
    # mmap
    ("mmap zero", lambda w: w.p.mmap(0), OSError, EINVAL, ()),
    ("mmap negative", lambda w: w.p.mmap(-PS), OSError, EINVAL, ()),
    ("mmap address space", lambda w: w.p.mmap(HUGE, populate=False), OSError, ENOMEM, ()),
    ("mmap beyond int64", lambda w: w.p.mmap(BIG, populate=False), OSError, ENOMEM, ()),
    ("mmap populate too big", lambda w: w.p.mmap(8 * MiB, node=1), OSError, ENOMEM, ENOMEM_IGNORE),
    ("mmap populate 2M folios too big", lambda w: w.p.mmap(4 * MiB, node=1, folio_size="2MiB"), OSError,
     ENOMEM, ENOMEM_IGNORE),
    ("mmap populate shared too big", lambda w: w.p.mmap(6 * MiB, node=0, shared=True), OSError, ENOMEM,
     ENOMEM_IGNORE),
    ("mmap node 2", lambda w: w.p.mmap(PS, node=2), OSError, EINVAL, ()),
    ("mmap node negative", lambda w: w.p.mmap(PS, node=-1), OSError, EINVAL, ()),
    ("mmap node huge", lambda w: w.p.mmap(PS, node=BIG), OSError, EINVAL, ()),
    ("mmap node outside cpuset", lambda w: w.only1.mmap(PS, node=0), OSError, EINVAL, ()),
    ("mmap folio 3KiB", lambda w: w.p.mmap(PS, folio_size="3KiB"), OSError, EINVAL, ()),
    ("mmap folio 2KiB", lambda w: w.p.mmap(PS, folio_size="2KiB"), OSError, EINVAL, ()),
    ("mmap folio 4MiB", lambda w: w.p.mmap(PS, folio_size="4MiB"), OSError, EINVAL, ()),
    ("mmap folio 12KiB", lambda w: w.p.mmap(PS, folio_size=12 * KiB), OSError, EINVAL, ()),
    ("mmap folio zero", lambda w: w.p.mmap(PS, folio_size=0), OSError, EINVAL, ()),
    ("mmap folio negative", lambda w: w.p.mmap(PS, folio_size=-PS), OSError, EINVAL, ()),
    ("mmap folio huge", lambda w: w.p.mmap(PS, folio_size=BIG), OSError, EINVAL, ()),
    ("mmap folio junk", lambda w: w.p.mmap(PS, folio_size="big"), OSError, EINVAL, ()),
    ("mmap folio float", lambda w: w.p.mmap(PS, folio_size=4096.0), TypeError, None, ()),
    ("mmap length str", lambda w: w.p.mmap("4096"), TypeError, None, ()),
    ("mmap length float", lambda w: w.p.mmap(4096.0), TypeError, None, ()),
    ("mmap length None", lambda w: w.p.mmap(None), TypeError, None, ()),
    ("mmap node str", lambda w: w.p.mmap(PS, node="0"), TypeError, None, ()),
    ("mmap shared int", lambda w: w.p.mmap(PS, shared=1), TypeError, None, ()),
    ("mmap populate str", lambda w: w.p.mmap(PS, populate="yes"), TypeError, None, ()),
    # munmap
    ("munmap unaligned", lambda w: w.p.munmap(w.priv + 1, PS), OSError, EINVAL, ()),
    ("munmap zero", lambda w: w.p.munmap(w.priv, 0), OSError, EINVAL, ()),
    ("munmap negative length", lambda w: w.p.munmap(w.priv, -PS), OSError, EINVAL, ()),
    ("munmap negative address", lambda w: w.p.munmap(-PS, PS), OSError, EINVAL, ()),
    ("munmap beyond address space", lambda w: w.p.munmap(w.priv, HUGE), OSError, EINVAL, ()),
    ("munmap beyond int64", lambda w: w.p.munmap(w.priv, BIG), OSError, EINVAL, ()),
    ("munmap address str", lambda w: w.p.munmap(str(w.priv), PS), TypeError, None, ()),
    ("munmap length float", lambda w: w.p.munmap(w.priv, 4096.0), TypeError, None, ()),
    # read
    ("read negative n", lambda w: w.p.read(w.priv, -1), OSError, EINVAL, ()),
    ("read unmapped", lambda w: w.p.read(0x1000, 1), OSError, EFAULT, ()),
    ("read negative address", lambda w: w.p.read(-1, 2), OSError, EFAULT, ()),
    ("read huge address", lambda w: w.p.read(BIG, 1), OSError, EFAULT, ()),
    ("read huge n", lambda w: w.p.read(w.priv, HUGE), OSError, EFAULT, ()),
    ("read n beyond int64", lambda w: w.p.read(w.priv, BIG), OSError, EFAULT, ()),
    ("read past end", lambda w: w.p.read(w.lazy + 8 * PS - 3, 4), OSError, EFAULT, ()),
    ("read into hole", lambda w: w.p.read(w.hole - 1, 2), OSError, EFAULT, ()),
    ("read poisoned", lambda w: w.p.read(w.priv + 7 * PS, 1), OSError, EHWPOISON, ()),
    ("read n str", lambda w: w.p.read(w.priv, "1"), TypeError, None, ()),
    ("read addr float", lambda w: w.p.read(float(w.priv), 1), TypeError, None, ()),
    # write
    ("write unmapped", lambda w: w.p.write(0x1000, b"x"), OSError, EFAULT, ()),
    ("write negative address", lambda w: w.p.write(-2, b"xx"), OSError, EFAULT, ()),
    ("write huge address", lambda w: w.p.write(BIG, b"x"), OSError, EFAULT, ()),
    ("write past end", lambda w: w.p.write(w.lazy + 8 * PS - 3, b"1234"), OSError, EFAULT, ()),
    ("write into hole", lambda w: w.p.write(w.hole - 2, b"1234"), OSError, EFAULT, ()),
    ("write past 2M folio", lambda w: w.p.write(w.big + 2 * MiB - 1, b"12"), OSError, EFAULT, ()),
    ("write poisoned", lambda w: w.p.write(w.priv + 7 * PS, b"p"), OSError, EHWPOISON, ()),
    ("write str", lambda w: w.p.write(w.priv, "text"), TypeError, None, ()),
    ("write int", lambda w: w.p.write(w.priv, 5), TypeError, None, ()),
    ("write None", lambda w: w.p.write(w.priv, None), TypeError, None, ()),
    ("write list", lambda w: w.p.write(w.priv, [1, 2]), TypeError, None, ()),
    ("write strided", lambda w: w.p.write(w.priv, np.arange(10, dtype=np.uint8)[::2]), TypeError, None, ()),
    ("write addr str", lambda w: w.p.write(str(w.priv), b"x"), TypeError, None, ()),
    # pin
    ("pin zero", lambda w: w.p.pin(w.priv, 0), OSError, EINVAL, ()),
    ("pin negative", lambda w: w.p.pin(w.priv, -1), OSError, EINVAL, ()),
    ("pin unmapped", lambda w: w.p.pin(0x1000, PS), OSError, EFAULT, ()),
    ("pin hole", lambda w: w.p.pin(w.hole, PS), OSError, EFAULT, ()),
    ("pin huge", lambda w: w.p.pin(w.priv, HUGE), OSError, EFAULT, ()),
    ("pin beyond int64", lambda w: w.p.pin(w.priv, BIG), OSError, EFAULT, ()),
    ("pin poisoned", lambda w: w.p.pin(w.priv + 6 * PS + PS, PS), OSError, EHWPOISON, ()),
    ("pin length str", lambda w: w.p.pin(w.priv, "1"), TypeError, None, ()),
    ("pin released twice", lambda w: w.dead_pin.release(), ValueError, None, ()),
    # lookups
    ("node_of unmapped", lambda w: w.p.node_of(0x1000), OSError, EFAULT, ()),
    ("node_of negative", lambda w: w.p.node_of(-PS), OSError, EFAULT, ()),
    ("node_of huge", lambda w: w.p.node_of(BIG), OSError, EFAULT, ()),
    ("node_of never touched", lambda w: w.p.node_of(w.lazy + 5 * PS), OSError, ENOENT, ()),
    ("node_of str", lambda w: w.p.node_of(str(w.priv)), TypeError, None, ()),
    ("pfn_of hole", lambda w: w.p.pfn_of(w.hole), OSError, EFAULT, ()),
    ("pfn_of never touched in child", lambda w: w.c.pfn_of(w.lazy + 7 * PS), OSError, ENOENT, ()),
    ("pfn_of float", lambda w: w.p.pfn_of(float(w.priv)), TypeError, None, ()),
    # hwpoison
    ("hwpoison negative", lambda w: w.m.hwpoison(-1), ValueError, None, ()),
    ("hwpoison past the end", lambda w: w.m.hwpoison(w.m.total_frames), ValueError, None, ()),
    ("hwpoison huge", lambda w: w.m.hwpoison(BIG), ValueError, None, ()),
    ("hwpoison str", lambda w: w.m.hwpoison("3"), TypeError, None, ()),
    ("hwpoison float", lambda w: w.m.hwpoison(3.0), TypeError, None, ()),
    ("hwpoison bool", lambda w: w.m.hwpoison(True), TypeError, None, ()),
    # move_pages: call-level errors
    ("move_pages flags STRICT", lambda w: w.p.move_pages(0, [w.priv], [1], flags=ce.MPOL_MF_STRICT), OSError,
     EINVAL, ()),
    ("move_pages flags unknown", lambda w: w.p.move_pages(0, [w.priv], [1], flags=8), OSError, EINVAL, ()),
    ("move_pages flags negative", lambda w: w.p.move_pages(0, [w.priv], [1], flags=-1), OSError, EINVAL, ()),
    ("move_pages flags str", lambda w: w.p.move_pages(0, [w.priv], [1], flags="2"), TypeError, None, ()),
    ("move_pages MOVE_ALL without cap", lambda w: w.p.move_pages(0, [w.priv], [1], flags=ce.MPOL_MF_MOVE_ALL),
     OSError, EPERM, ()),
    ("move_pages unknown pid", lambda w: w.p.move_pages(999, [w.priv], [1]), OSError, ESRCH, ()),
    ("move_pages negative pid", lambda w: w.p.move_pages(-1, [w.priv], [1]), OSError, ESRCH, ()),
    ("move_pages huge pid", lambda w: w.p.move_pages(BIG, [w.priv], [1]), OSError, ESRCH, ()),
    ("move_pages exited pid", lambda w: w.p.move_pages(w.dead.pid, [w.dead_a], [1]), OSError, ESRCH, ()),
    ("move_pages other uid", lambda w: w.p.move_pages(w.other.pid, [w.other_a], [1]), OSError, EPERM, ()),
    ("move_pages pid str", lambda w: w.p.move_pages("0", [w.priv], [1]), TypeError, None, ()),
    ("move_pages length mismatch", lambda w: w.p.move_pages(0, [w.priv, w.big], [1]), OSError, EINVAL, ()),
    ("move_pages node 2", lambda w: w.p.move_pages(0, [w.priv], [2]), OSError, ENODEV, ()),
    ("move_pages node negative", lambda w: w.p.move_pages(0, [w.priv], [-1]), OSError, ENODEV, ()),
    ("move_pages node huge", lambda w: w.p.move_pages(0, [w.priv], [1 << 62]), OSError, ENODEV, ()),
    ("move_pages node outside cpuset", lambda w: w.only1.move_pages(0, [0x1000], [0]), OSError, EACCES, ()),
    ("move_pages pages str", lambda w: w.p.move_pages(0, "1234", [1]), TypeError, None, ()),
    ("move_pages pages int", lambda w: w.p.move_pages(0, w.priv, [1]), TypeError, None, ()),
    ("move_pages page str", lambda w: w.p.move_pages(0, [str(w.priv)], [1]), TypeError, None, ()),
    ("move_pages page float", lambda w: w.p.move_pages(0, [float(w.priv)], [1]), TypeError, None, ()),
    ("move_pages page array float", lambda w: w.p.move_pages(0, np.array([1.0]), [1]), TypeError, None, ()),
    ("move_pages nodes str", lambda w: w.p.move_pages(0, [w.priv], "1"), TypeError, None, ()),
    ("move_pages node float", lambda w: w.p.move_pages(0, [w.priv], [1.0]), TypeError, None, ()),
    ("move_pages node bool", lambda w: w.p.move_pages(0, [w.priv], [True]), TypeError, None, ()),
    ("move_pages exited caller", lambda w: w.dead.move_pages(0, [w.dead_a], [1]), OSError, ESRCH, ()),
    # migrate_pages
    ("migrate_pages node outside", lambda w: w.p.migrate_pages(0, [0], [2]), OSError, EPERM, ()),
    ("migrate_pages bad mask, unknown pid", lambda w: w.p.migrate_pages(999, [0], [2]), OSError, ESRCH, ()),
    ("migrate_pages negative node", lambda w: w.p.migrate_pages(0, [-1], [1]), OSError, EINVAL, ()),
    ("migrate_pages huge node", lambda w: w.p.migrate_pages(0, [0], [BIG]), OSError, EINVAL, ()),
    ("migrate_pages unknown pid", lambda w: w.p.migrate_pages(999, [0], [1]), OSError, ESRCH, ()),
    ("migrate_pages exited pid", lambda w: w.p.migrate_pages(w.dead.pid, [0], [1]), OSError, ESRCH, ()),
    ("migrate_pages other uid", lambda w: w.p.migrate_pages(w.other.pid, [0], [1]), OSError, EPERM, ()),
    ("migrate_pages outside target cpuset", lambda w: w.p.migrate_pages(w.only1.pid, [1], [0]), OSError,
     EPERM, ()),
    ("migrate_pages nodes str", lambda w: w.p.migrate_pages(0, "0", [1]), TypeError, None, ()),
    ("migrate_pages nodes int", lambda w: w.p.migrate_pages(0, 0, [1]), TypeError, None, ()),
    ("migrate_pages node float", lambda w: w.p.migrate_pages(0, [0], [1.0]), TypeError, None, ()),
    ("migrate_pages pid str", lambda w: w.p.migrate_pages("0", [0], [1]), TypeError, None, ()),
    ("migrate_pages exited caller", lambda w: w.dead.migrate_pages(0, [0], [1]), OSError, ESRCH, ()),
    # an exited process
    ("exited read", lambda w: w.dead.read(w.dead_a, 1), OSError, ESRCH, ()),
    ("exited read empty", lambda w: w.dead.read(w.dead_a, 0), OSError, ESRCH, ()),
    ("exited write", lambda w: w.dead.write(w.dead_a, b"x"), OSError, ESRCH, ()),
    ("exited write empty", lambda w: w.dead.write(w.dead_a, b""), OSError, ESRCH, ()),
    ("exited mmap", lambda w: w.dead.mmap(PS), OSError, ESRCH, ()),
    ("exited munmap", lambda w: w.dead.munmap(w.dead_a, PS), OSError, ESRCH, ()),
    ("exited pin", lambda w: w.dead.pin(w.dead_a, PS), OSError, ESRCH, ()),
    ("exited fork", lambda w: w.dead.fork(), OSError, ESRCH, ()),
    ("exited node_of", lambda w: w.dead.node_of(w.dead_a), OSError, ESRCH, ()),
    ("exited pfn_of", lambda w: w.dead.pfn_of(w.dead_a), OSError, ESRCH, ()),
]


@pytest.mark.parametrize("label,call,exc,code,ignore", CASES, ids=[c[0] for c in CASES])
def test_bad_call_gets_the_contracts_error_and_changes_nothing(world, label, call, exc, code, ignore):
    expect(world, call, exc, code, ignore)
    world.still_works()


def test_errors_are_the_right_oserror_subclasses(world):
    w = world
    assert isinstance(expect(w, lambda w: w.p.read(0x1000, 1), OSError, EFAULT), OSError)
    assert isinstance(expect(w, lambda w: w.dead.read(w.dead_a, 1), OSError, ESRCH), ProcessLookupError)
    assert isinstance(expect(w, lambda w: w.p.move_pages(w.other.pid, [0], [1]), OSError, EPERM),
                      PermissionError)
    e = expect(w, lambda w: w.p.read(w.priv + 7 * PS, 1), OSError, EHWPOISON)
    assert "hardware" in e.strerror.lower()
    with pytest.raises(OSError) as ei:
        w.p.move_pages(0, [w.priv, w.big], [1, 2])
    assert ei.value.errno == ENODEV
    assert ei.value.status == [1, None]   # the entry before the bad node was migrated
    assert w.p.node_of(w.priv) == 1
    check_machine(w.m)


def test_mt_beyond_the_cpus_names_the_maximum(world):
    before = world.m.engine_spec
    e = expect(world, lambda w: w.m.set_engine("mt:100000"), ValueError, None)
    assert "maximum" in str(e)
    assert world.m.engine_spec == before


def test_failing_pin_release_and_double_release(world):
    w = world
    pin = w.p.pin(w.priv + 2 * PS, 3 * PS)
    pin.release()
    expect(w, lambda w: pin.release(), ValueError, None)


# ----------------------------------------------------------------------------- constructors
CONSTRUCTOR_CASES = [
    (dict(nodes=0), ValueError), (dict(nodes=-1), ValueError), (dict(nodes=65), ValueError),
    (dict(nodes=BIG), ValueError), (dict(nodes="2"), TypeError), (dict(nodes=2.0), TypeError),
    (dict(nodes=True), TypeError), (dict(nodes=None), TypeError),
    (dict(node_size=0), ValueError), (dict(node_size=-(2 * MiB)), ValueError),
    (dict(node_size="1MiB"), ValueError), (dict(node_size=3 * MiB), ValueError),
    (dict(node_size="4KB"), ValueError), (dict(node_size="four MiB"), ValueError),
    (dict(node_size="4 MiB x"), ValueError), (dict(node_size=""), ValueError),
    (dict(node_size=[1]), TypeError), (dict(node_size=4.0 * MiB), TypeError),
    (dict(node_size=None), TypeError), (dict(node_size=True), TypeError),
    (dict(nodes=64, node_size=1 << 56), ValueError),              # the host cannot reserve it
    (dict(page_size="8KiB"), ValueError), (dict(page_size=0), ValueError),
    (dict(page_size="2MiB"), ValueError), (dict(page_size=4096.0), TypeError),
    (dict(page_size=None), TypeError),
    (dict(engine="warp-drive"), ValueError), (dict(engine="mt:0"), ValueError),
    (dict(engine="serial,mt"), ValueError), (dict(engine=5), TypeError),
]


@pytest.mark.parametrize("kwargs,exc", CONSTRUCTOR_CASES, ids=[repr(k) for k, _ in CONSTRUCTOR_CASES])
def test_constructor_errors(kwargs, exc):
    args = dict(nodes=1, node_size="2MiB")
    args.update(kwargs)
    with pytest.raises(exc) as ei:
        ce.Machine(**args)
    assert str(ei.value)


@pytest.mark.parametrize("kwargs", [dict(nodes=1, node_size=1 << 63), dict(nodes=2, node_size=1 << 62),
                                    dict(nodes=1, node_size=BIG)])
def test_constructor_huge_node_size_is_a_valueerror(kwargs):
    with pytest.raises(ValueError):
        ce.Machine(**kwargs)


def test_closed_machine_refuses_everything():
    m = ce.Machine(nodes=2, node_size="4MiB")
    p = m.spawn()
    a = p.mmap(PS)
    m.close()
    m.close()                     # idempotent
    for call in (lambda: m.spawn(), lambda: p.read(a, 1), lambda: p.write(a, b"x"), lambda: p.mmap(PS),
                 lambda: p.move_pages(0, [a], [1]), lambda: m.set_engine("serial"), lambda: m.hwpoison(5),
                 lambda: p.fork(), lambda: p.pin(a, 1)):
        with pytest.raises(ValueError, match="closed"):
            call()


# ----------------------------------------------------------------------------- the CLI
def run_cli(argv):
    """(exit status, stdout, stderr) of ``copyengine ARGV`` run in-process; SystemExit
    (argparse) and a returned status count alike."""
    from copyengine.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


#: (argv, a piece of the message)
QUICK = ["--quick", "--counts", "1", "--page-size", "4KiB", "--repeat", "1", "--warmup", "0", "--no-progress"]
CLI_CASES = [
    ([], "required"),
    (["nosuch"], "invalid choice"),
    (["--bogus", "engines"], "unrecognized"),
    (["engines", "--bogus"], "unrecognized"),
    (["engines", "--json", "extra"], "unrecognized"),
    (["-p", "no.such.module", "bench", "--quick"], "no.such.module"),   # engines lists it instead (exit 1)
    (["-p", "", "engines"], "plugin"),
    (["bench", "--bogus"], "unrecognized"),
    (["bench", "--repeat", "0"], "--repeat"),
    (["bench", "--repeat", "-3"], "--repeat"),
    (["bench", "--repeat", "x"], "--repeat"),
    (["bench", "--repeat", str(BIG) + "x"], "--repeat"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["bench", "--counts", "0"], "--counts"),
    (["bench", "--counts", "-1"], "--counts"),
    (["bench", "--counts", "abc"], "--counts"),
    (["bench", "--counts", "1,,2"], "--counts"),
    (["bench", "--page-size", "3KiB"], "3KiB"),
    (["bench", "--page-size", "2MiB@8KiB"], "8KiB"),
    (["bench", "--page-size", "4MiB"], "4MiB"),
    (["bench", "--page-size", ""], "--page-size"),
    (["bench", "--configs", "warp"], "warp"),
    (["bench", "--configs", ""], "--configs"),
    (["bench", "--configs", "serial,,mt"], "--configs"),
    (["bench", "--configs", "mt:"], "--configs"),
    (["bench", "--ceiling", "abc"], "--ceiling"),
    (["bench", "--ceiling", "-1"], "--ceiling"),
    (["bench", "--ceiling", "0"], "--ceiling"),
    (["bench", "--json", "/nonexistent-dir/x.json"], "--json"),
    (["bench", "--csv", "/"], "--csv"),
    (["bench", "--markdown", "/nonexistent-dir/x.md"], "--markdown"),
]


@pytest.mark.parametrize("argv,hint", CLI_CASES, ids=[" ".join(a) or "<none>" for a, _ in CLI_CASES])
def test_cli_bad_options_exit_2_with_a_clear_message(argv, hint):
    if argv[:1] == ["bench"]:
        argv = ["bench"] + QUICK + argv[1:]    # the bad option comes last and wins; a bench
        #                                        that wrongly accepts it stays short
    rc, out, err = run_cli(argv)
    assert rc == 2, (rc, out[-300:], err[-300:])
    last = err.strip().splitlines()[-1]
    assert "error" in last and hint in last, err
    assert "Traceback" not in err


@pytest.mark.parametrize("spec", ["mt:0", "mt:abc", "serial:1"])
def test_cli_bench_rejects_malformed_engine_specs(spec):
    rc, out, err = run_cli(["bench", "--configs", spec] + QUICK)
    assert rc == 2 and spec in err


def test_cli_good_commands_still_work():
    rc, out, err = run_cli(["engines", "--json"])
    assert rc == 0 and '"engines"' in out
    rc, out, err = run_cli(["-p", "copyengine.testing.engines", "engines"])
    assert rc == 0 and "eio" in out
    rc, out, err = run_cli(["bench", "--configs", "serial"] + QUICK)
    assert rc == 0, err
