"""CopyJob.stream: a batch of a call that moves at least NT_BYTES in all is marked for
non-temporal stores even when the batch itself is small, on the cheap path and the full
path alike; a small call's batches are not. The hint changes how bytes are stored, never
which bytes: contents, statuses and counters are those of a call without it."""
import numpy as np
import pytest

import copyengine as ce
from copyengine.engines.memops import NT_BYTES
from copyengine.engines.serial import SerialEngine
from copyengine.plugins import make_plugin_manager

PS = 4096


class StreamSpy(SerialEngine):
    """serial, remembering the ``stream`` hint of every job it copies."""

    name = "streamspy"

    def __init__(self):
        self.seen = []

    def copy(self, job):
        self.seen.append((job.stream, job.total_bytes))
        return super().copy(job)


class Plugin:
    def __init__(self):
        self.engine = StreamSpy()

    @ce.hookimpl
    def copyengine_register_engines(self, register):
        register("streamspy", lambda arg, machine: self.engine, "serial that records job.stream")


class Watcher:  # any migration-event observer takes calls off the cheap path
    @ce.hookimpl
    def copyengine_migration_event(self, machine, event, info):
        pass


@pytest.mark.parametrize("full", [False, True], ids=["cheap-path", "full-path"])
@pytest.mark.parametrize("pages, streams", [(NT_BYTES // PS, True), (NT_BYTES // PS // 8, False)],
                         ids=["call-of-NT_BYTES", "small-call"])
def test_every_batch_of_a_large_call_streams(full, pages, streams):
    plugin = Plugin()
    pm = make_plugin_manager(entry_points=False, plugins=[plugin] + ([Watcher()] if full else []))
    with ce.Machine(nodes=2, node_size="64MiB", plugin_manager=pm) as m:
        m.set_engine("streamspy")
        m.settings["nr_max_batched_migration"] = 512  # 2 MiB batches, each below NT_BYTES
        p = m.spawn()
        a = p.mmap(pages * PS)
        data = np.random.default_rng(pages).integers(0, 256, pages * PS, dtype=np.uint8).tobytes()
        p.write(a, data)
        before = m.vmstat["pgmigrate_success"]
        r = p.move_pages(0, [a + i * PS for i in range(pages)], [1] * pages)
        assert r.ret == 0 and set(r.status) == {1}
        assert p.read(a, pages * PS) == data
        assert m.vmstat["pgmigrate_success"] - before == pages
        seen = plugin.engine.seen
        assert len(seen) == max(1, pages // 512) and all(nbytes < NT_BYTES for _, nbytes in seen)
        assert {s for s, _ in seen} == {streams}
