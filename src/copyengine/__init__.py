"""copyengine: a faithful Python model of Linux page migration with pluggable copy engines.

>>> import copyengine as ce
>>> with ce.Machine(nodes=2, node_size="64MiB") as m:
...     p = m.spawn()
...     a = p.mmap(1 << 20)
...     p.write(a, b"hello")
...     r = p.move_pages(0, [a], [1])
...     (r.ret, r.status, p.read(a, 5))
(0, [1], b'hello')
"""
from .errors import EHWPOISON, EngineUnavailable, MachineClosedError, PluginError
from .hookspecs import hookimpl, hookspec
from .machine import Machine
from .mm.process import Pin, Process
from .uapi import MPOL_MF_MOVE, MPOL_MF_MOVE_ALL, MPOL_MF_STRICT
from .uapi import MPOL_BIND, MPOL_DEFAULT, MPOL_INTERLEAVE, MPOL_LOCAL, MPOL_PREFERRED  # noqa: F401

__version__ = "0.1.0"

__all__ = ["EHWPOISON", "EngineUnavailable", "PluginError", "MachineClosedError", "Machine", "Process", "Pin", "MPOL_MF_STRICT",
           "MPOL_MF_MOVE", "MPOL_MF_MOVE_ALL", "hookimpl", "hookspec", "__version__"]
