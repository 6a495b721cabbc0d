"""prism-rt batch --ray: a local Ray cluster with 2 CPU actors against the local job (same rows,
bit-identical images on the same backend and thread count), resumed after a SIGKILL of the driver,
an unreadable image recorded as failed, and the refusals that need no cluster."""
from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prism_rt.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engines" / "phantom-demo"
PHANTOMS = sorted((ENGINE / "images").glob("phantom-100000?.png"))
TIMINGS = ("invert_s", "edit_s")


def _dataset(root: Path) -> Path:
    """Six images (the three phantoms and three noisy copies) and one that is not a PNG at all."""
    from PIL import Image

    (root / "imgs").mkdir()
    rng = np.random.default_rng(3)
    rows = []
    for k in range(6):
        pixels = np.asarray(Image.open(PHANTOMS[k % 3]), np.float64)  # 16-bit
        if k >= 3:
            pixels = np.clip(pixels + rng.normal(0, 500.0, pixels.shape), 0, 65535)
        Image.fromarray(pixels.astype(np.uint16)).save(root / "imgs" / f"img{k}.png")
        rows.append([f"imgs/img{k}.png", "1", "1" if k != 4 else "0"])  # img4: the edit does not apply
    (root / "imgs" / "broken.png").write_bytes(b"not an image")
    rows.insert(2, ["imgs/broken.png", "1", "1"])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Path", "No Finding", "Support Devices"], *rows])
    return root / "labels.csv"


def _cmd(labels: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "prism_rt.cli", "batch", "--csv", str(labels), "--out", str(out), "--model",
            str(ENGINE), "--steps", "6", "--self-replace", "0.3,0.6", "--threads", "1", "--group", "2",
            "--no-figure", "--no-progress", "--edit", "Support Devices=remove", *extra]


def _table(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


def _pixels(out: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {str(p.relative_to(out)): np.asarray(Image.open(p)) for p in sorted(out.glob("*/*.png"))}


@pytest.mark.slow
def test_ray_job_equals_local_job_and_resumes_after_sigkill(tmp_path):
    pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install 'prism-rt[ray]')")
    labels = _dataset(tmp_path)
    local = subprocess.run(_cmd(labels, tmp_path / "local"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert local.returncode == 1, local.stderr  # broken.png fails: the exit code says so
    # the Ray job is killed (SIGKILL, the driver) once an image is published, then rerun: it finishes
    # what is left, and inverts no image twice
    out = tmp_path / "ray"
    proc = subprocess.Popen(_cmd(labels, out, "--ray"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list(out.glob("*/result.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job ended before it could be killed"
    # the actors outlive their driver by a moment (Ray then ends them): wait until nothing more appears
    done_before, still = set(), 0.0
    while still < 2.0:
        now = {p.parent.name for p in out.glob("*/result.json")}
        still = still + 0.25 if now == done_before else 0.0
        done_before = now
        time.sleep(0.25)
    assert 0 < len(done_before) < 6
    rerun = subprocess.run(_cmd(labels, out, "--ray", "--ray-actors", "2"), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr
    assert f"{len(done_before)} of 7 images already done" in rerun.stderr
    assert "Ray: 2 actor(s) (1 CPU thread(s) each) on 1 node(s)" in rerun.stderr
    inverted, reused = map(int, re.match(r"inverted (\d+), reused (\d+)", rerun.stdout).groups())
    assert inverted + reused == 5 - len(done_before - {"imgs__img4"})  # no finished image is inverted again
    assert len(list((out / ".cache" / "inversions").glob("*.npz"))) == 5  # nor any image twice

    table, reference = _table(out), _table(tmp_path / "local")
    assert table == reference and len(table) == 7
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "ok", "ok", "skipped", "ok"]
    assert "broken.png" in table[2]["error"]
    assert (out / "job.json").read_text() == (tmp_path / "local" / "job.json").read_text()
    ours, theirs = _pixels(out), _pixels(tmp_path / "local")
    assert sorted(ours) == sorted(theirs) and len(ours) == 5 * 2  # two self-window candidates per image
    for name in theirs:
        assert np.array_equal(ours[name], theirs[name]), name
    assert not [p for p in out.iterdir() if ".prism-" in p.name]


def test_ray_refusals_need_no_cluster(tmp_path, capsys, monkeypatch):
    labels = _dataset(tmp_path)
    argv = ["batch", "--csv", labels, "--out", tmp_path / "o", "--model", ENGINE, "--edit", "Support Devices=remove"]
    assert main([*argv, "--ray-actors", "2"]) == 2
    assert capsys.readouterr().err == "error: --ray-actors goes with --ray\n"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main([*argv, "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prism-rt batch --ray needs the 'ray' package") and "prism-rt[ray]" in err
    assert err.count("\n") == 1 and not (tmp_path / "o" / "job.json").exists()


def test_actor_device():
    from prism_rt.batch_ray import _actor_device

    assert _actor_device("cpu") == ("cpu", False)
    assert _actor_device("cuda:3") == ("cuda", True)  # Ray leaves the actor its GPU as device 0
    assert _actor_device("tensorrt:1") == ("tensorrt", True)
