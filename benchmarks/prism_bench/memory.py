"""Peak host memory of one configuration: read in the process that ran it.

Why not ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (what the bench read until now): on Linux a
process's ``ru_maxrss`` survives ``exec``. multiprocessing's "spawn" starts a child by (v)fork +
exec of the coordinator; at exec the kernel records the old address space's high-water mark (the
coordinator's, with vfork its peak) in the process's signal struct, and ``ru_maxrss`` is the larger
of that and the new address space's. So every spawned configuration reported at least the
coordinator's peak: the same figure in every row. Reading it from the coordinator instead does not
help: ``os.wait4``'s rusage of the child carries the same inherited floor, and ``RUSAGE_CHILDREN``
is the maximum over all children waited for so far (no per-child delta can be taken from a maximum).

What the bench reads: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this *address
space* (``mm->hiwater_rss``: anonymous, file-backed and shared pages, the same quantity as
``ru_maxrss`` counts). exec makes a new address space, so in a spawned process it starts from the
child's own first page; ``/usr/bin/time -v`` of the same configuration run alone agrees with it
(``tests/test_bench_memory.py``). Writing "5" to ``/proc/self/clear_refs`` (Linux ≥ 4.0) resets it
to the current RSS: that is how one process measures its peak over one stretch of work.

Off Linux there is no ``/proc``: macOS falls back to ``ru_maxrss`` (bytes there), not checked for
the same inheritance; Windows reports nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

# with --no-isolate the configurations share the coordinator's process: one configuration's own
# peak is not measurable there (the process holds what earlier ones and the coordinator left behind)
SHARED_NOTE = ("one process for every configuration (--no-isolate): a configuration's own peak is not "
               "measurable; process_peak_rss_mb is the shared process's peak while it ran")


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float | None:
    """This process's peak resident set in MB since it started (or since :func:`reset_peak_rss`):
    Linux ``VmHWM``; elsewhere ``ru_maxrss`` (see the module's docstring); None on Windows."""
    if _STATUS.is_file():
        return _status_mb("VmHWM")
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)


def rss_mb() -> float | None:
    """This process's resident set now, MB (Linux; None elsewhere)."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False where that is not possible (not
    Linux, a kernel before 4.0, a read-only /proc)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def run_shared(fn, job):
    """``fn(job)`` in this process (--no-isolate), its rows marked as sharing it: ``peak_rss_mb``
    None (see :data:`SHARED_NOTE`) and ``process_peak_rss_mb`` the process's peak while ``fn`` ran
    (None where the high-water mark cannot be reset)."""
    reset = reset_peak_rss()
    out = fn(job)
    peak = peak_rss_mb() if reset else None
    for row in out if isinstance(out, list) else [out]:
        mark_shared(row, peak)
    return out


def mark_shared(row: dict, process_peak_mb: float | None) -> dict:
    if "peak_rss_mb" in row:
        row["peak_rss_mb"] = None
        row["process_peak_rss_mb"] = process_peak_mb
        row["peak_rss_note"] = SHARED_NOTE
    return row
