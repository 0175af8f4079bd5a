"""Named timing marks inside the layers: the hook a profiler fills, at the bottom of the package.

The functional layers mark their expensive steps with ``with section("im2col"): ...``
(also ``"conv GEMM"``, ``"col2im"``). Nothing is timed unless a recorder is installed
(:class:`npsoftmax.profiler.Profiler` installs itself while attached): then each mark
adds its wall time to ``recorder.add_section(name, seconds)``. Without one, ``section``
returns a shared do-nothing context (~0.1 µs per mark), so the layers do not depend on
the profiling tools above them.
"""

import contextlib
import time

__all__ = ["section", "install", "uninstall", "active"]

_recorder = None  # the one object receiving section times, or None
_NULL_CONTEXT = contextlib.nullcontext()


class _Section:
    """Context manager that reports its wall time to the recorder under ``name``."""

    __slots__ = ("recorder", "name", "start")

    def __init__(self, recorder, name):
        self.recorder = recorder
        self.name = name

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc_info):
        self.recorder.add_section(self.name, time.perf_counter() - self.start)
        return False


def section(name):
    """Time the enclosed block under ``name`` if a recorder is installed (else a no-op context)."""
    if _recorder is None:
        return _NULL_CONTEXT
    return _Section(_recorder, name)


def active():
    """The installed recorder, or None."""
    return _recorder


def install(recorder):
    """Make ``recorder`` (anything with ``add_section(name, seconds)``) receive the marks; one at a time."""
    global _recorder
    if _recorder is not None:
        raise RuntimeError("another recorder (Profiler) is already active; profilers do not nest")
    _recorder = recorder


def uninstall(recorder):
    """Remove ``recorder`` if it is the installed one."""
    global _recorder
    if _recorder is recorder:
        _recorder = None
