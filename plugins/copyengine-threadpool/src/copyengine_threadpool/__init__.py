"""copyengine-threadpool: a NumPy thread-pool copy engine for copyengine.

For machines without Numba (or where Numba's threading layers are unavailable): after
``pip install copyengine-threadpool``, ``Machine.set_engine("pool:4")`` copies each
migration batch with four threads, and ``"pool-async:4"`` does so asynchronously.
See :mod:`copyengine_threadpool.engine` for how, and the project's ``docs/plugins.md``
for this package as a worked example of an engine plugin.
"""
from .engine import (AsyncThreadPoolEngine, Plan, PoolCompletion, ThreadPoolEngine, make_plan,
                     parse_threads)

__version__ = "0.1.0"

__all__ = ["AsyncThreadPoolEngine", "Plan", "PoolCompletion", "ThreadPoolEngine", "make_plan",
           "parse_threads", "__version__"]
