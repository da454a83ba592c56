"""The conformance kit: the built-in engines pass it, the fault-injecting test engines
pass what they should, and deliberately broken engines are caught."""
import errno
import threading
import time

import numpy as np
import pytest

import copyengine.testing.engines as test_engines
from copyengine.engines.base import PENDING, Capabilities, Completion, Engine, copy_descriptors
from copyengine.engines.serial import SerialEngine
from copyengine.testing import ConformanceError, EngineConformance, check_engine
from copyengine.testing.conformance import (Options, check_cancel_no_write, check_poisoned_folio,
                                            check_random_jobs, check_timeout, layouts)

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- built-ins
class TestSerial(EngineConformance):
    engine_spec = "serial"


class TestVanilla(EngineConformance):
    engine_spec = "vanilla"


class TestMt(EngineConformance):
    engine_spec = "mt"


class TestMtOneThreadAnyByte(EngineConformance):
    engine_spec = "mt:1"
    granule = 1


class TestMtAnyByte(EngineConformance):
    engine_spec = "mt"
    granule = 1
    max_examples = 25


class TestFactory(EngineConformance):
    engine_factory = staticmethod(lambda machine: SerialEngine())
    max_examples = 10


# ----------------------------------------------------------------------------- test engines
class TestOutOfOrder(EngineConformance):
    engine_spec = "ooo:20"
    plugins = (test_engines,)
    max_examples = 25


class TestEio(EngineConformance):
    engine_spec = "eio:2"
    plugins = ("copyengine.testing.engines",)
    may_decline = True


def opts(spec, **kw):
    kw.setdefault("max_examples", 15)
    kw.setdefault("plugins", (test_engines,))
    return Options(spec, **kw)


def test_eio_must_declare_that_it_declines():
    with pytest.raises(ConformanceError, match="may_decline"):
        check_random_jobs(opts("eio:1", shrink=False))


def test_hang_engine_cancels_cleanly_but_never_completes():
    assert check_cancel_no_write(opts("hang:3")) is None
    assert check_timeout(opts("hang:3")) is None
    with pytest.raises(ConformanceError, match="did not complete"):
        check_random_jobs(opts("hang", timeout=0.2, max_examples=3, shrink=False))


def test_check_engine_reports_each_check():
    report = check_engine("serial", max_examples=5)
    assert report["random_jobs"] == "passed"
    assert report["cancel_no_write"].startswith("skipped: synchronous")
    report = check_engine("ooo", plugins=[test_engines], max_examples=5,
                          only=["random_jobs", "cancel_no_write"])
    assert report == {"random_jobs": "passed", "cancel_no_write": "passed"}


@pytest.mark.parametrize("granule", [1, 8, 4096])
def test_layouts_describe_disjoint_folios(granule):
    from hypothesis import given, settings

    @settings(max_examples=30)
    @given(layouts(granule=granule))
    def run(layout):
        job = layout.job(np.zeros(8 << 20, np.uint8))
        assert job.total_bytes == sum(layout.sizes)
        assert (job.nbytes > 0).all() and (job.nbytes % granule == 0).all()
        assert ((job.src_off % granule) == 0).all()
        spans = sorted(zip(job.src_off.tolist() + job.dst_off.tolist(), (job.nbytes.tolist() * 2)))
        for (a, n), (b, _) in zip(spans, spans[1:]):
            assert a + n <= b
    run()


# ----------------------------------------------------------------------------- broken engines
class _Sync(Engine):
    capabilities = Capabilities(threads=1, mc_safe=True)

    def copy(self, job):
        copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes)
        return np.where(job.src_poisoned, -133, 0).astype(np.int32)


class Overrun(_Sync):
    """Writes the byte after each destination."""
    def copy(self, job):
        for d, n in zip(job.dst_off, job.nbytes):
            job.mem[d + n] ^= 1
        return super().copy(job)


class ScribblesSource(_Sync):
    def copy(self, job):
        res = super().copy(job)
        if len(job.src_off):
            job.mem[job.src_off[0]] ^= 0xFF
        return res


class ReadsPoison(_Sync):
    """Claims mc-safety, yet copies poisoned sources (reports -EHWPOISON afterwards)."""


ReadsPoison.copy = lambda self, job: (copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes),
                                      np.where(job.src_poisoned, -133, 0).astype(np.int32))[1]


class PoisonOk(_Sync):
    capabilities = Capabilities(threads=1, mc_safe=False)

    def copy(self, job):
        copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes)
        return np.zeros(job.nr_folios, np.int32)


class WrongDtype(_Sync):
    def copy(self, job):
        return super().copy(job).astype(np.int64)


class Declines(_Sync):
    def copy(self, job):
        return np.full(job.nr_folios, -errno.EOPNOTSUPP, np.int32)


class SkipsLastDescriptor(_Sync):
    """Reports a folio copied when one of its descriptors was not."""
    def copy(self, job):
        n = len(job.nbytes)
        copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes, range(max(0, n - 1)))
        return np.where(job.src_poisoned, -133, 0).astype(np.int32)


class _Async(Engine):
    capabilities = Capabilities(asynchronous=True, threads=1, channels=1, mc_safe=True)


class CompletesEarly(_Async):
    """Marks each folio done, then copies it."""
    def submit(self, job):
        c = Completion(job.nr_folios)

        def run():
            for f in range(job.nr_folios):
                c.complete([f], -133 if job.src_poisoned[f] else 0)
                time.sleep(0.002)
                if not job.src_poisoned[f]:
                    sel = np.nonzero(job.folio == f)[0]
                    copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes, sel)
            c.finish()
        threading.Thread(target=run, daemon=True).start()
        return c


class IgnoresCancel(_Async):
    """Keeps writing after cancel() returned (a DMA engine without terminate_sync)."""
    def submit(self, job):
        c = Completion(job.nr_folios)

        def run():
            for f in range(job.nr_folios):
                time.sleep(0.001)
                sel = np.nonzero(job.folio == f)[0]
                copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes, sel)
                c.complete([f], 0)
            c.finish()
        threading.Thread(target=run, daemon=True).start()
        return c


class NeverFinishes(_Async):
    """Completes every folio but never calls finish()."""
    def submit(self, job):
        c = Completion(job.nr_folios)
        copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes)
        c.complete(np.arange(job.nr_folios), 0)
        return c


def factory(cls):
    return lambda machine: cls()


@pytest.mark.parametrize("cls, check, message", [
    (Overrun, check_random_jobs, "outside the destinations"),
    (ScribblesSource, check_random_jobs, "outside the destinations"),
    (ReadsPoison, check_poisoned_folio, "wrote its destination"),
    (PoisonOk, check_poisoned_folio, "not mc-safe reports -EIO"),
    (WrongDtype, check_random_jobs, "must be int32"),
    (Declines, check_random_jobs, "may_decline"),
    (SkipsLastDescriptor, check_random_jobs, "differs from its source"),
    (test_engines.NoCopyEngine, check_random_jobs, "differs from its source"),
    (CompletesEarly, check_random_jobs, "before its bytes were all copied"),
    (IgnoresCancel, check_cancel_no_write, "after cancel"),
    (NeverFinishes, check_random_jobs, "did not complete"),
])
def test_broken_engines_are_caught(cls, check, message):
    o = Options(factory(cls), max_examples=20, timeout=0.5, shrink=False)
    with pytest.raises(ConformanceError, match=message):
        check(o)


def test_declining_is_fine_when_declared():
    check_random_jobs(Options(factory(Declines), may_decline=True, max_examples=10))


def _unavailable(machine):
    from copyengine import EngineUnavailable
    raise EngineUnavailable("no DMA channel here")


class TestUnavailableEngineSkips(EngineConformance):
    engine_factory = staticmethod(_unavailable)
    # one check shows the behaviour; the others are not collected
    test_empty_job = test_random_jobs = test_poisoned_folio = test_framework_path = None
    test_concurrent_jobs = test_cancel_no_write = test_timeout = None

    def test_capabilities(self):
        with pytest.raises(pytest.skip.Exception, match="no DMA channel here"):
            super().test_capabilities()
        self.skip_unavailable = False
        from copyengine import EngineUnavailable
        with pytest.raises(EngineUnavailable):
            super().test_capabilities()


def test_missing_spec_is_explained():
    with pytest.raises(ConformanceError, match="engine_spec"):
        check_random_jobs(Options(None))


def test_pending_value_is_the_protocols():
    assert PENDING == -errno.EINPROGRESS


# ----------------------------------------------------------------------------- in a migration
@pytest.fixture
def test_machine():
    import copyengine as ce
    from copyengine.plugins import make_plugin_manager
    pm = make_plugin_manager(plugins=[test_engines])
    with ce.Machine(nodes=2, node_size="16MiB", plugin_manager=pm) as m:
        yield m


@pytest.mark.parametrize("spec", ["eio:1", "eio:2", "ooo:100", "hang", "hang:2"])
def test_faulty_engines_never_lose_a_byte(test_machine, spec):
    from copyengine import EHWPOISON
    m = test_machine
    m.settings["copy_timeout"] = 0.05
    m.set_engine(spec)
    p = m.spawn()
    a = p.mmap(8 * 4096)
    big = p.mmap(2 << 20, folio_size="2MiB")
    data = np.random.default_rng(5).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes()
    p.write(a, data[:8 * 4096])
    p.write(big, data)
    m.hwpoison(p.pfn_of(a + 3 * 4096))
    pages = [a + i * 4096 for i in range(8)] + [big]
    r = p.move_pages(0, pages, [1] * len(pages))
    assert r.status == [1, 1, 1, -EHWPOISON, 1, 1, 1, 1, 1]
    for i in range(8):
        if i != 3:
            assert p.read(a + i * 4096, 4096) == data[i * 4096:(i + 1) * 4096]
    assert p.read(big, 2 << 20) == data


def test_ooo_completes_out_of_order():
    from copyengine.engines.base import CopyJob
    n = 16
    mem = np.zeros(2 * n * 4096, np.uint8)
    s = np.arange(n, dtype=np.int64) * 4096
    job = CopyJob(mem, s, s + n * 4096, np.full(n, 4096, np.int64), np.arange(n), np.zeros(n, bool))
    c = test_engines.OutOfOrderEngine(delay_us=2000).submit(job)
    order = []
    deadline = time.monotonic() + 10
    while len(order) < n and time.monotonic() < deadline:
        order += [f for f in np.nonzero(c.result == 0)[0].tolist() if f not in order]
        time.sleep(0.0002)
    assert c.wait(10) is not None and sorted(order) == list(range(n))
    assert order != sorted(order)


def test_nocopy_measures_overhead_only():
    from copyengine.engines.base import CopyJob
    mem = np.ones(8192, np.uint8)
    mem[4096:] = 0
    job = CopyJob(mem, np.array([0]), np.array([4096]), np.array([4096]), np.array([0]),
                  np.array([False]))
    assert test_engines.NoCopyEngine().copy(job).tolist() == [0]
    assert not mem[4096:].any()


def _mt_non_temporal(machine):
    from copyengine.engines.mt import MtEngine, max_threads
    e = MtEngine(max_threads())
    e.nt_bytes = 0              # every batch through the non-temporal path
    return e


class TestMtNonTemporalAnyByte(EngineConformance):
    engine_factory = staticmethod(_mt_non_temporal)
    granule = 1
    max_examples = 30


def test_check_engine_takes_the_documented_timeout():
    """docs/plugins.md documents check_engine(..., timeout=): a hung asynchronous engine
    is reported after that many seconds, not the default 30."""
    with pytest.raises(ConformanceError, match=r"did not complete in 0\.3 s"):
        check_engine("hang", plugins=[test_engines], timeout=0.3, max_examples=2, only=["random_jobs"],
                     shrink=False)
    for bad in (0, -1, "1", None, True):
        with pytest.raises(ValueError, match="timeout"):
            check_engine("serial", timeout=bad, only=["capabilities"])


def test_run_engine_is_exported():
    import copyengine.engines as engines
    from copyengine.engines.base import run_engine
    assert "run_engine" in engines.__all__ and engines.run_engine is run_engine
