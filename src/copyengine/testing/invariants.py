"""Machine invariants for tests, in one import: whole-machine checks at rest
(:mod:`.machine_checks`: :func:`check_machine`, :class:`InvariantError`), the shadow model
of memory contents (:mod:`.shadow`: :class:`ShadowMemory`), and state compared across a
call (:mod:`.snapshots`: :func:`snapshot`, :func:`diff`, :func:`assert_unchanged`,
:class:`PageWatch`).

:func:`check_machine` checks, with array operations over the whole machine, everything
that must hold whenever no call is in progress (frames, allocator, folios, map counts,
references, no migration entries or locked pages, rmap roots; optionally every byte
against a :class:`ShadowMemory`); a failure raises :class:`InvariantError` (an
AssertionError) naming the frames involved. :func:`snapshot` records everything a
rejected call must not change; compare two with :func:`assert_unchanged` (or
:func:`diff`).
"""
from .machine_checks import InvariantError, check_machine, free_frames_expected, poisoned_frames
from .shadow import ShadowMemory
from .shadow import _Seg as _Seg  # tests build shadow segments
from .snapshots import PageWatch, assert_unchanged, diff, snapshot

__all__ = ["InvariantError", "check_machine", "ShadowMemory", "PageWatch", "snapshot", "diff",
           "assert_unchanged", "poisoned_frames", "free_frames_expected"]
