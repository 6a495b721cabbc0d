"""prism_rt.publish: a result folder is replaced whole or not at all, whoever else writes or dies.

Every writer here puts its id into every file it writes, so "the folder is wholly one result"
is checkable: all files carry one id and the names are exactly that writer's names.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import re
import signal
import threading
import time

import numpy as np
import pytest

from prism_rt.errors import InversionFileError, OutputError
from prism_rt.publish import _Lock, check_writable, staged_dir, staged_file, sweep_stale

FORK = multiprocessing.get_context("fork")


def names_of(writer: str) -> set[str]:
    """Writers write different file sets (by the length of their id), so a merge shows in the names."""
    return {"result.json", *(f"f{i}.txt" for i in range(len(writer) % 5 + 2))}


def write_result(out, writer: str, delay: float = 0.0, barrier=None, **kw) -> None:
    if barrier is not None:
        barrier.wait()
    with staged_dir(out, **kw) as stage:
        for name in sorted(names_of(writer) - {"result.json"}):
            (stage / name).write_text(writer)
            time.sleep(delay)
        (stage / "result.json").write_text(json.dumps({"writer": writer}))


def result_writer(out) -> str:
    """The one writer whose result ``out`` is; fails on a mixed or partial folder."""
    names = {p.name for p in out.iterdir()}
    writer = json.loads((out / "result.json").read_text())["writer"]
    assert names == names_of(writer), f"mixed folder: {sorted(names)} for writer {writer}"
    for name in names - {"result.json"}:
        assert (out / name).read_text() == writer, f"{name} is from another writer than result.json"
    return writer


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if re.search(r"\.prism-(stage|old|lock)", p.name))


def test_rerun_replaces_the_old_result_whole(tmp_path):
    out = tmp_path / "out"
    write_result(out, "first-writer")  # 14 % 5 + 2 = 6 files
    write_result(out, "second")  # 6 % 5 + 2 = 3 files: f3…f5 must go
    assert result_writer(out) == "second"
    assert leftovers(tmp_path) == []


def test_a_folder_squatting_on_an_output_name_does_not_break_publishing(tmp_path):
    out = tmp_path / "out"
    write_result(out, "old")
    (out / "f0.txt").unlink()
    (out / "f0.txt").mkdir()  # a directory where the new result writes a file
    (out / "f0.txt" / "inner").write_text("x")
    write_result(out, "new-one")
    assert result_writer(out) == "new-one" and (out / "f0.txt").is_file()
    assert leftovers(tmp_path) == []


def test_an_existing_folder_that_is_not_a_result_is_refused_untouched(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match=r"not a prism-rt result.*thesis\.tex"):
        check_writable(docs)
    with pytest.raises(OutputError, match="not a prism-rt result"):
        write_result(docs, "w")
    assert [p.name for p in docs.iterdir()] == ["thesis.tex"] and leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    write_result(tmp_path / "empty", "w")  # an empty folder is fine
    assert result_writer(tmp_path / "empty") == "w"


@pytest.mark.parametrize("races", [50])
def test_concurrent_writers_never_leave_a_mixed_folder(tmp_path, races):
    for race in range(races):
        out = tmp_path / f"race{race}"
        if race % 2:
            write_result(out, "previous-result")
        barrier = FORK.Barrier(2)
        writers = [f"w{race}a", f"wr{race}b"]  # 5 and 6 files (or 6 and 2): a merge shows
        procs = [FORK.Process(target=write_result, args=(out, w, 0.001 * (race % 3), barrier)) for w in writers]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0]
        assert result_writer(out) in writers
    assert leftovers(tmp_path) == []


def test_concurrent_threads_exclude_each_other_too(tmp_path):
    """flock belongs to an open file description: threads opening the lock file separately exclude
    each other like processes, and a thread's sweep leaves a sibling thread's stage alone."""
    out = tmp_path / "out"
    errors = []

    def run(writer):
        try:
            write_result(out, writer, 0.0005)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for race in range(10):
        threads = [threading.Thread(target=run, args=(f"t{race}-{k}" + "x" * k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        result_writer(out)
    assert leftovers(tmp_path) == []


def _slow_writer(out, writer):
    write_result(out, writer, delay=0.01)


def test_kill_9_at_any_moment_leaves_the_old_or_the_new_result(tmp_path):
    rng = random.Random(29)
    out = tmp_path / "out"
    write_result(out, "original")
    seen = set()
    for attempt in range(20):
        before = result_writer(out)
        writer = f"k{attempt}"  # 4 or 5 files against the original's 5
        proc = FORK.Process(target=_slow_writer, args=(out, writer))
        proc.start()
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        sweep_stale(tmp_path)  # what the next run does first
        assert leftovers(tmp_path) == [], f"attempt {attempt}"
        now = result_writer(out)
        assert now in (before, writer)
        seen.add("new" if now == writer else "old")
    write_result(out, "rerun")
    assert result_writer(out) == "rerun" and leftovers(tmp_path) == []
    assert "old" in seen  # the kill landed during writing at least once


def _dead_pid() -> int:
    proc = FORK.Process(target=lambda: None)
    proc.start()
    proc.join()
    return proc.pid


def test_an_old_result_orphaned_between_the_two_renames_is_put_back(tmp_path):
    write_result(tmp_path / "out", "original")
    pid = _dead_pid()
    os.rename(tmp_path / "out", tmp_path / f".out.prism-old-{pid}-0badf00d")
    (tmp_path / f".out.prism-stage-{pid}-deadbeef").mkdir()  # the new one, never moved in
    (tmp_path / f".out.prism-stage-{pid}-deadbeef" / "f0.txt").write_text("partial")
    (tmp_path / ".out.prism-lock").write_text(f"{pid}\n")
    sweep_stale(tmp_path)
    assert result_writer(tmp_path / "out") == "original" and leftovers(tmp_path) == []


def test_sweeping_spares_a_live_writer(tmp_path):
    stage = tmp_path / f".out.prism-stage-{os.getpid()}-00000000"
    stage.mkdir()  # our own pid: a sibling thread's stage
    sweep_stale(tmp_path)
    assert stage.is_dir()
    old = time.time() - 2 * 24 * 3600
    os.utime(stage, (old, old))  # two days old and unlocked: abandoned whatever the pid says
    sweep_stale(tmp_path)
    assert not stage.exists()


def test_a_held_lock_times_out_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with _Lock(out.absolute(), 1.0):
        with pytest.raises(OutputError, match=rf"another process \(pid {os.getpid()}\)"):
            write_result(out, "w", wait_s=0.2)
    assert leftovers(tmp_path) == [] and not out.exists()


def test_write_errors_are_typed_and_leave_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"no space left on the device.*free some space") as err:
        with staged_dir(out) as stage:
            (stage / "a.png").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device", str(stage / "b.png"))
    assert "\n" not in str(err.value) and str(out) in str(err.value)
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(ZeroDivisionError):  # other errors pass through, the stage still goes
        with staged_dir(out):
            1 / 0
    assert leftovers(tmp_path) == []
    denied = OSError(errno.EACCES, "Permission denied")
    monkeypatch.setattr("prism_rt.publish.os.mkdir", lambda *a, **k: (_ for _ in ()).throw(denied))
    with pytest.raises(OutputError, match="permission denied; choose a --out in a folder you can write to"):
        write_result(out, "w")


def test_preflight_refusals(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    cases = {"": "is empty", "/": "root folder", str(tmp_path / "file"): "exists and is not a folder",
             str(tmp_path / "file" / "below"): "which is a file"}
    for out, message in cases.items():
        with pytest.raises(OutputError, match=message):
            check_writable(out)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="current folder"):
        check_writable(".")
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"  # made when writing
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        check_writable(tmp_path, folder=False, flag="--save")
    monkeypatch.setattr("prism_rt.publish.os.access", lambda *a: False)
    with pytest.raises(OutputError, match="permission denied"):
        check_writable(tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_an_output_error(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            write_result(parent / "out", "w")
    finally:
        parent.chmod(0o755)


def test_staged_file_is_atomic_and_typed(tmp_path):
    path = tmp_path / "inv.npz"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with staged_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert path.read_text() == "old" and leftovers(tmp_path) == []
    with staged_file(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and leftovers(tmp_path) == []
    with pytest.raises(OutputError, match="no space left"):
        with staged_file(path):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "new"


# ---------------------------------------------------------------- saved inversions


def _inversion(**arrays):
    from prism_rt.config import InversionConfig, InversionMethod, SamplerConfig
    from prism_rt.imageio import FitInfo
    from prism_rt.inversion import Inversion

    fit = FitInfo("resize", 300, 200, 16, (0, 0, 300, 200), 0.0).to_json()
    values = dict(trajectory=np.zeros((3, 1, 4, 2, 2), np.float32), fitted_pixels=np.zeros((3, 16, 16), np.float32))
    values.update(arrays)
    return Inversion(method=InversionMethod.DIRECT, source_prompt="a chest x-ray", sampler=SamplerConfig(steps=2),
                     config=InversionConfig(method=InversionMethod.DIRECT), meta={"fit": fit}, **values)


def test_inversion_round_trip_and_typed_save_errors(tmp_path, monkeypatch):
    from prism_rt.inversion import Inversion

    saved = _inversion().save(tmp_path / "inv.npz")
    assert saved == tmp_path / "inv.npz" and leftovers(tmp_path) == []
    assert Inversion.load(saved).meta["fit"]["orig_height"] == 300
    monkeypatch.setattr("prism_rt.publish.os.access", lambda *a: False)
    with pytest.raises(OutputError, match=r"--save .*permission denied"):
        _inversion().save(tmp_path / "ro" / "inv.npz")
    monkeypatch.undo()
    monkeypatch.setattr("numpy.savez", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OutputError, match="no space left"):
        _inversion().save(saved)
    assert Inversion.load(saved) and leftovers(tmp_path) == []


@pytest.mark.parametrize("case, message", [
    ("huge-latents", r"trajectory holds \|values\| up to 1e\+30"),
    ("nan-latents", "trajectory holds NaN"),
    ("zero-size", "original size 0×200"),
    ("box-outside", "does not lie inside"),
    ("too-large", "exceeds the limit"),
])
def test_inversion_load_refuses_implausible_files(tmp_path, case, message):
    from prism_rt.inversion import Inversion

    inv = _inversion()
    if case == "huge-latents":
        inv.trajectory[1] = 1e30
    elif case == "nan-latents":
        inv.trajectory[0, 0, 0, 0, 0] = np.nan
    else:
        fit = inv.meta["fit"]
        fit.update({"zero-size": {"orig_height": 0}, "box-outside": {"box": [0, 5, 300, 200]},
                    "too-large": {"orig_height": 100_000, "orig_width": 100_000,
                                  "box": [0, 0, 100_000, 100_000]}}[case])
    path = inv.save(tmp_path / f"{case}.npz")
    with pytest.raises(InversionFileError, match=message) as err:
        Inversion.load(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- write_edit_outputs


def _edit_result(n: int = 2):
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    items = [SimpleNamespace(name=f"edit-1-s0.{k}0") for k in range(n)]
    edits = [rng.uniform(-1, 1, (3, 16, 16)).astype(np.float32) for _ in items]
    return SimpleNamespace(items=items, edits=edits, reconstruction=np.zeros((3, 16, 16), np.float32),
                           reconstruction_error=0.0, plan_words=[["a"]], timings={}, counts={}, settings={},
                           item_stats=lambda: [{"name": i.name} for i in items])


@pytest.mark.parametrize("extras", [False, True])
def test_outputs_are_lean_by_default_and_list_exactly_what_was_written(tmp_path, extras):
    from prism_rt.outputs import write_edit_outputs

    out, result = tmp_path / "out", _edit_result()
    inversion = _inversion()
    inversion.meta["source_image"] = {"bit_depth": 16}
    selection = [{"selected_item": "edit-1-s0.10"}]
    write_edit_outputs(tmp_path / "out", _edit_result(3), inversion, {}, extras=True)  # an earlier, larger run
    write_edit_outputs(out, result, inversion, {"run": 2}, selection=selection, figure=True, extras=extras)
    record = json.loads((out / "result.json").read_text())
    expected = {"edit-1-s0.00.png", "edit-1-s0.10.png", "selected-0.png", "figure.png", "result.json"}
    if extras:
        expected |= {"reconstruction.png", "diff-1-s0.00.png", "diff-1-s0.10.png"}
    assert {p.name for p in out.iterdir()} == set(record["files"]) == expected
    assert record["parameters"] == {"run": 2} and leftovers(tmp_path) == []
    assert ("diff" in record["items"][0]["files"]) == extras
    from PIL import Image

    with Image.open(out / "edit-1-s0.00.png") as im:
        assert (im.size, im.mode) == ((200, 300), "I;16")
