"""Thread safety of the public entry points on one model.

Eager decoding keeps every mutable tensor in per-call states, so threads can share a model freely. The static
decode and speculative steps (gdnspec.runtime) reuse cached fixed-shape buffers per model (the state of a
StaticDecoder, a StaticSpecRunner's trees and states, CUDA graphs that read them): two threads using them at once
would overwrite each other's rows. `static_lock(model)` serializes that use per model (a re-entrant lock, created on
first use and dropped with the model). A `SpecSession` holds one batch's live state and belongs to one thread at a
time: `exclusive` makes a second thread's concurrent call raise instead of corrupting it.
"""
from __future__ import annotations

import functools
import threading
import weakref

_LOCKS: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def static_lock(model) -> threading.RLock:
    """The lock that guards `model`'s cached static decoders / runners (one per model object)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def exclusive(method):
    """Decorate a method of an object with a `_busy` threading.Lock: a call while another thread is inside one of
    its exclusive methods raises RuntimeError (the same thread may nest calls)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        me = threading.get_ident()
        if self._owner == me:  # nested call in the thread that holds it
            return method(self, *args, **kwargs)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(f"{type(self).__name__}.{method.__name__}: this object is in use by another thread; "
                               "give each thread its own (e.g. engine.session() per thread)")
        self._owner = me
        try:
            return method(self, *args, **kwargs)
        finally:
            self._owner = None
            self._busy.release()

    return wrapper
