"""The bench's peak-RSS figure is each configuration's own (``prism_bench/memory.py``).

A spawned configuration used to read ``getrusage(RUSAGE_SELF).ru_maxrss``, which on Linux it
inherits from the coordinator across (v)fork + exec: every row showed the coordinator's peak. Here
the coordinator holds 300 MiB while it spawns a configuration that touches 300 MiB and one that
touches nothing; each must report its own peak, and the figure must agree with ``/usr/bin/time -v``
of the same work run alone.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MIB = 2**20
linux = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")


def _touch(job: dict) -> dict:
    """A configuration: allocates and writes ``job["mb"]`` MiB, then reports like the bench's workers."""
    import resource

    from prism_bench.memory import peak_rss_mb

    block = np.ones(job["mb"] * MIB, np.uint8) if job["mb"] else None  # every page written
    row = {"kind": "probe", "peak_rss_mb": peak_rss_mb(),
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    del block
    return row


@pytest.fixture(scope="module")
def coordinator_holding_300_mib():
    held = np.ones(300 * MIB, np.uint8)
    yield held
    del held


@linux
def test_each_spawned_configuration_reports_its_own_peak_not_the_coordinators(coordinator_holding_300_mib):
    from prism_bench.memory import peak_rss_mb
    from prism_bench.suite import _in_process

    assert peak_rss_mb() >= 300
    big = _in_process(_touch, {"mb": 300})
    small = _in_process(_touch, {"mb": 0})
    assert big["peak_rss_mb"] >= 300
    assert small["peak_rss_mb"] < 150 and big["peak_rss_mb"] - small["peak_rss_mb"] >= 0.9 * 300
    # the cause of the old figure: ru_maxrss of the small child is the coordinator's (≥ 300 MiB)
    assert small["ru_maxrss_mb"] >= 300


@linux
@pytest.mark.skipif(shutil.which("time", path="/usr/bin") is None, reason="needs /usr/bin/time (apt-get install time)")
def test_peak_matches_usr_bin_time_of_the_same_configuration_alone(coordinator_holding_300_mib):
    from prism_bench.suite import _in_process

    tests, bench = Path(__file__).parent, Path(__file__).parents[1] / "benchmarks"
    code = (f"import sys; sys.path[:0] = [{str(tests)!r}, {str(bench)!r}]\n"
            "from test_bench_memory import _touch\nprint(_touch({'mb': 300})['peak_rss_mb'])")
    for mb in (300, 0):
        code_mb = code.replace("'mb': 300", f"'mb': {mb}")
        done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code_mb], capture_output=True, text=True,
                              check=True)
        alone_own = float(done.stdout.strip())
        timed = next(int(line.split(":")[1]) / 1024 for line in done.stderr.splitlines()
                     if "Maximum resident set size" in line)
        spawned = _in_process(_touch, {"mb": mb})["peak_rss_mb"]
        assert alone_own == pytest.approx(timed, rel=0.10)
        assert spawned == pytest.approx(timed, rel=0.10), (mb, spawned, timed)


@linux
def test_no_isolate_reports_no_per_configuration_peak(coordinator_holding_300_mib):
    from prism_bench.memory import SHARED_NOTE, peak_rss_mb, reset_peak_rss, rss_mb, run_shared

    import gc

    gc.collect()  # earlier tests' garbage freed now, not while the configuration runs (it would hide its 50 MiB)
    transient = np.ones(200 * MIB, np.uint8)  # this process's peak: held 300 + 200 MiB
    del transient
    base = rss_mb()  # the pytest process's own size (larger when other tests ran before)
    assert peak_rss_mb() >= base + 190
    row = run_shared(_touch, {"mb": 50})
    assert row["peak_rss_mb"] is None and row["peak_rss_note"] == SHARED_NOTE
    if reset_peak_rss():  # the shared process's peak while the configuration ran: not the earlier transient
        assert base + 40 <= row["process_peak_rss_mb"] < base + 150
    else:
        assert row["process_peak_rss_mb"] is None
