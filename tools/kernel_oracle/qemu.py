"""Run scenarios on a stock Debian kernel under QEMU (TCG) with two NUMA nodes.

The kernel comes from a Debian .deb fetched with ``apt-get download`` and unpacked with
``dpkg-deb`` (nothing is built from source); the payload is oracle.c, compiled static
and packed as the initramfs's /init beside /scenarios.txt. One boot runs every scenario;
QEMU always runs under a timeout, and a boot that dies (multi-threaded TCG sometimes oopses
while the kernel patches its text) is retried, the last try with ``thread=single``.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("KERNEL_ORACLE_CACHE", Path.home() / ".cache" / "kernel_oracle"))
PACKAGES = {"6.12": "linux-image-6.12*-amd64-unsigned", "6.1": "linux-image-6.1.0-*-amd64-unsigned"}


def fetch_kernel(package: str) -> Path:
    """A vmlinuz from the Debian package ``package`` (exact name), cached."""
    dest = CACHE / package
    found = glob.glob(str(dest / "boot" / "vmlinuz-*"))
    if found:
        return Path(found[0])
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", package], cwd=dest, check=True, timeout=600)
    deb = sorted(dest.glob("*.deb"))[-1]
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True,
                         timeout=300).stdout
    subprocess.run(["tar", "-x", "--wildcards", "./boot/vmlinuz-*"], input=tar, cwd=dest, check=True,
                   timeout=300)
    deb.unlink()
    return Path(glob.glob(str(dest / "boot" / "vmlinuz-*"))[0])


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
    out = hdr.encode() + nb
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def build_initramfs(scenarios: str, path: Path, init_binary: Path) -> None:
    """A newc cpio: /init (oracle.c), /scenarios.txt and the mount points."""
    parts = [_cpio_entry(d, 0o040755, ino=i + 1) for i, d in enumerate(("dev", "proc", "sys"))]
    parts.append(_cpio_entry("init", 0o100755, init_binary.read_bytes(), ino=10))
    parts.append(_cpio_entry("scenarios.txt", 0o100644, scenarios.encode(), ino=11))
    parts.append(_cpio_entry("TRAILER!!!", 0, ino=0))
    path.write_bytes(b"".join(parts))


def compile_oracle(dest: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler: apt-get install gcc")
    out = dest / "init"
    subprocess.run([cc, "-static", "-O1", "-o", str(out), str(HERE / "oracle.c")], check=True, timeout=300)
    return out


def qemu_command(kernel: Path, initrd: Path, console: Path, results: Path, single_thread: bool) -> list:
    accel = "tcg,thread=single" if single_thread else "tcg"
    return ["qemu-system-x86_64", "-accel", accel, "-m", "1G", "-smp", "2",
            "-object", "memory-backend-ram,id=m0,size=512M", "-object", "memory-backend-ram,id=m1,size=512M",
            "-numa", "node,nodeid=0,cpus=0,memdev=m0", "-numa", "node,nodeid=1,cpus=1,memdev=m1",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet loglevel=3 panic=-1 numa_balancing=disable",
            "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{console}", "-serial", f"file:{results}"]


def run_kernel(scenarios: str, kernel: Path, timeout: float = 600, tries: int = 3, log=print) -> str:
    """Boot once, run every scenario; returns oracle.c's output. Raises RuntimeError
    (with the console's tail) if no try finished."""
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    with tempfile.TemporaryDirectory(prefix="kernel_oracle_") as td:
        td = Path(td)
        init = compile_oracle(td)
        initrd = td / "initrd.cpio"
        build_initramfs(scenarios, initrd, init)
        tail = ""
        for t in range(tries):
            console, results = td / f"console{t}.log", td / f"results{t}.txt"
            cmd = qemu_command(kernel, initrd, console, results, single_thread=(t == tries - 1))
            try:
                subprocess.run(cmd, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                log(f"try {t + 1}: QEMU ran past {timeout} s")
            text = results.read_text(errors="replace") if results.exists() else ""
            if "# done" in text:
                return text
            tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
            log(f"try {t + 1}: no complete result; console tail:\n{tail[-800:]}")
        raise RuntimeError(f"the kernel run did not finish in {tries} tries; console tail:\n{tail}")
