"""Testing helpers for copyengine and for engine authors.

* :class:`EngineConformance` / :func:`check_engine` — the engine conformance kit
  (:mod:`copyengine.testing.conformance`)::

      from copyengine.testing import EngineConformance

      class TestMyEngine(EngineConformance):
          engine_spec = "mydma:2"

* :mod:`copyengine.testing.engines` — a plugin (not registered by default) with the
  ``nocopy`` engine (measures framework overhead) and fault-injecting engines
  (``eio``, ``ooo``, ``hang``). Register it with
  ``make_plugin_manager(plugins=[copyengine.testing.engines])``.

* :mod:`copyengine.testing.hostile` — plugins that fail every way a plugin can (raise at
  each hook, malformed results, bad frames, late writes...) and
  :func:`~copyengine.testing.hostile.check_engine_survives`, which runs them all around an
  engine and checks that no byte is lost.

Importing this package needs hypothesis (``pip install copyengine[test]``).
"""
from . import engines
from .conformance import CHECKS, ConformanceError, EngineConformance, Layout, check_engine, layouts

__all__ = ["CHECKS", "ConformanceError", "EngineConformance", "Layout", "check_engine",
           "engines", "layouts"]
