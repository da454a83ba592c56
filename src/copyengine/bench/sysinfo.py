"""The bench's header (what ran where) and its ceiling (plain memcpy bandwidth).

The **ceiling** is this host's plain copy bandwidth over a buffer far larger than the
caches: numpy slice copies in 1..N Python threads (numpy releases the GIL), each thread
one contiguous share of the buffer, best of several repeats per thread count; the best
thread count wins. It runs in a child process so that its buffers (2 x at least 512 MiB)
never count in the bench's peak resident memory.

Beside the ceiling it also measures the same copies cut into 2 MiB pieces (``chunked``),
the granularity a per-folio copy engine works at: glibc's ``memcpy`` switches to
non-temporal stores only above ``x86_non_temporal_threshold`` (a share of the L3), so a
copy of one huge buffer may be far faster than the same bytes copied folio by folio.
Both are reported; the ceiling the tables divide by is the huge-buffer one. The bench
samples it at the start, between page sizes and at the end, and keeps the best sample:
other work on the host can only make a copy slower.
"""
from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time

from ..machine import _meminfo as host_meminfo

MiB = 1 << 20
MIN_CEILING_BYTES = 512 * MiB


# --------------------------------------------------------------------------- header
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        return os.cpu_count() or 1


def _meminfo() -> dict:
    """/proc/meminfo in bytes: the Machine's own reader (its host-size check uses it too)."""
    return host_meminfo()


def _read(path) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _selected(s: str | None) -> str | None:
    """``always [madvise] never`` -> ``madvise``."""
    if not s:
        return None
    m = re.search(r"\[([^\]]+)\]", s)
    return m.group(1) if m else s


def llc_bytes() -> int | None:
    """The largest cache the first CPU reports (sysfs)."""
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        names = os.listdir(base)
    except OSError:
        return None
    for n in names:
        size = _read(os.path.join(base, n, "size"))
        if not size:
            continue
        m = re.match(r"(\d+)([KMG]?)", size)
        if m:
            v = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
            best = v if best is None else max(best, v)
    return best


def glibc_tunables() -> dict:
    """glibc's memcpy thresholds (``ld.so --list-tunables``) and GLIBC_TUNABLES."""
    out = {"version": "-".join(platform.libc_ver()) or None,
           "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES")}
    for ld in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1", "/lib/ld-linux-x86-64.so.2"):
        if os.path.exists(ld):
            try:
                text = subprocess.run([ld, "--list-tunables"], capture_output=True, text=True,
                                      timeout=5, env=dict(os.environ)).stdout
            except (OSError, subprocess.SubprocessError):
                break
            for key in ("x86_non_temporal_threshold", "x86_rep_movsb_threshold", "x86_shared_cache_size"):
                m = re.search(rf"glibc\.cpu\.{key}: (0x[0-9a-f]+|\d+)", text)
                if m:
                    out[key] = int(m.group(1), 0)
            break
    return out


def _numba_info() -> dict:
    out = {}
    try:
        import numba
        out["numba"] = numba.__version__
    except Exception as e:  # pragma: no cover - numba is a dependency
        out["numba"] = None
        out["numba_error"] = f"{type(e).__name__}: {e}"
        return out
    try:
        # public API only (issue 15): get_num_threads() starts Numba's thread pool, after
        # which threading_layer() can name the layer it loaded. It costs what the private
        # _launch_threads() did (one pool start, ~5 ms), no compile of a parallel function
        numba.get_num_threads()
        out["numba_threading_layer"] = numba.threading_layer()
        out["numba_num_threads"] = int(numba.config.NUMBA_NUM_THREADS)
    except Exception as e:
        out["numba_threading_layer"] = None
        out["numba_threading_error"] = f"{type(e).__name__}: {e}"
    return out


def _opencl_info() -> dict:
    try:
        import pyopencl as cl
    except Exception as e:
        return {"opencl": None, "opencl_error": f"pyopencl not importable: {type(e).__name__}: {e}"}
    try:
        devices = []
        for plat in cl.get_platforms():
            for d in plat.get_devices():
                devices.append(f"{d.name.strip()} ({plat.name.strip()}, {cl.device_type.to_string(d.type)})")
        return {"opencl": devices[0] if devices else None, "opencl_devices": devices,
                "pyopencl": getattr(cl, "VERSION_TEXT", None),
                "PYOPENCL_CTX": os.environ.get("PYOPENCL_CTX")}
    except Exception as e:
        return {"opencl": None, "opencl_error": f"{type(e).__name__}: {e}"}


def machine_info(pm=None) -> dict:
    """The header: host, CPU, cores, memory, Python/numpy/numba (threading layer), OpenCL
    device, glibc copy thresholds, THP mode, copyengine version and its engines."""
    import numpy as np
    import copyengine
    mem = _meminfo()
    info = {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": mem.get("MemTotal"),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "copyengine": getattr(copyengine, "__version__", None),
        "llc_bytes": llc_bytes(),
        "thp": _selected(_read("/sys/kernel/mm/transparent_hugepage/enabled")),
        "glibc": glibc_tunables(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": loadavg(),
    }
    info.update(_numba_info())
    info.update(_opencl_info())
    if pm is not None:
        try:
            from ..plugins import engine_registry, plugin_report
            info["engines"] = {n: e.source for n, e in engine_registry(pm).items()}
            failed = [p for p in plugin_report(pm) if p["status"] == "failed"]
            if failed:
                info["plugin_failures"] = failed
        except Exception as e:  # the header must never break the bench
            info["engines_error"] = f"{type(e).__name__}: {e}"
    return info


def loadavg():
    """The 1, 5 and 15 minute load averages (other work on the host skews every number)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


# --------------------------------------------------------------------------- ceiling
def ceiling_bytes(quick: bool = False) -> int:
    """Buffer size for the ceiling: at least 512 MiB and twice the largest cache the CPU
    reports, capped by an eighth of the memory available (per buffer). ``quick``: 128 MiB."""
    if quick:
        return 128 * MiB
    want = max(MIN_CEILING_BYTES, 2 * (llc_bytes() or 0))
    avail = _meminfo().get("MemAvailable")
    if avail:
        want = min(want, max(MIN_CEILING_BYTES, avail // 8))
    return -(-want // MiB) * MiB


def _copy_threads(dst, src, nthreads, chunk=None):
    """Copy src -> dst with ``nthreads`` threads, each a contiguous share; ``chunk``:
    each share is copied in pieces of that many bytes. Returns seconds."""
    n = len(src)
    edges = [(n * i // nthreads) // 4096 * 4096 for i in range(nthreads)] + [n]

    def work(lo, hi):
        if chunk is None:
            dst[lo:hi] = src[lo:hi]
        else:
            for o in range(lo, hi, chunk):
                e = min(o + chunk, hi)
                dst[o:e] = src[o:e]

    if nthreads == 1:
        t0 = time.perf_counter()
        work(0, n)
        return time.perf_counter() - t0
    ths = [threading.Thread(target=work, args=(edges[i], edges[i + 1])) for i in range(nthreads)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return time.perf_counter() - t0


def measure_ceiling_here(nbytes: int, max_threads: int, repeat: int = 3, chunk: int = 2 * MiB) -> dict:
    """Measure in this process (the bench calls :func:`measure_ceiling`, which runs this
    in a child). GB/s = 1e9 bytes/s, best of ``repeat`` per thread count."""
    import numpy as np
    src = np.empty(nbytes, np.uint8)
    dst = np.empty(nbytes, np.uint8)
    src.view(np.uint64)[:] = np.uint64(0x0123456789ABCDEF)
    dst[:] = 1   # first touch of both buffers, outside every timing
    per, chunked = {}, {}
    for t in range(1, max_threads + 1):
        per[t] = nbytes / min(_copy_threads(dst, src, t) for _ in range(repeat)) / 1e9
        chunked[t] = nbytes / min(_copy_threads(dst, src, t, chunk) for _ in range(max(2, repeat // 2))) / 1e9
    best_t = max(per, key=per.get)
    best_c = max(chunked, key=chunked.get)
    ok = bool((dst[:4096] == src[:4096]).all())
    return {"gbps": per[best_t], "threads": best_t, "buffer_bytes": nbytes, "repeat": repeat,
            "per_threads": {str(k): v for k, v in per.items()},
            "chunked": {"chunk_bytes": chunk, "gbps": chunked[best_c], "threads": best_c,
                        "per_threads": {str(k): v for k, v in chunked.items()}},
            "method": "numpy slice copies in Python threads (one contiguous share each), "
                      "best of repeats per thread count, best thread count",
            "verified": ok}


def measure_ceiling(nbytes: int | None = None, max_threads: int | None = None, repeat: int = 3,
                    quick: bool = False, timeout: float = 300) -> dict:
    """Run :func:`measure_ceiling_here` in a child Python (its buffers must not inflate the
    bench's resident memory); if that fails, fall back to this process and say so."""
    nbytes = nbytes or ceiling_bytes(quick)
    max_threads = max_threads or cores()
    code = ("import json,sys; from copyengine.bench.sysinfo import measure_ceiling_here as f; "
            f"print(json.dumps(f({int(nbytes)}, {int(max_threads)}, {int(repeat)})))")
    try:
        cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        if cp.returncode == 0:
            out = json.loads(cp.stdout.strip().splitlines()[-1])
            out["process"] = "child"
            return out
        err = (cp.stderr.strip().splitlines() or ["?"])[-1]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        err = f"{type(e).__name__}: {e}"
    out = measure_ceiling_here(nbytes, max_threads, repeat)
    out["process"] = "bench (child failed: " + err + ")"
    return out


# --------------------------------------------------------------------------- memory
def rss_bytes() -> dict:
    """VmRSS and VmHWM (peak) of this process, bytes."""
    out = {}
    text = _read("/proc/self/status") or ""
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
        if m:
            out[key] = int(m.group(1)) * 1024
    if "VmHWM" not in out:
        try:
            import resource
            out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except Exception:  # pragma: no cover
            pass
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mapping_rss(address: int) -> int | None:
    """Resident bytes of the mapping of this process that contains ``address`` (smaps)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
                if head:
                    inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
                    continue
                if inside and line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
