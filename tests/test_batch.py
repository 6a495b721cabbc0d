"""prism-rt batch: the work list (CSV, captions, edits), a job end to end on the bundled phantom
engine, the inversion cache, refusals, per-image failures, and resuming after SIGKILL."""
from __future__ import annotations

import csv
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prism_rt.batch_csv import BatchInputError, EditSpec, image_id, parse_label, plan_edit, read_chexpert_csv
from prism_rt.captions import NORMAL_CAPTION
from prism_rt.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engines" / "phantom-demo"
PHANTOMS = sorted((ENGINE / "images").glob("phantom-100000?.png"))
FAST = ["--model", str(ENGINE), "--steps", "3", "--self-replace", "0.5", "--threads", "1"]
HEADER = ["Path", "No Finding", "Cardiomegaly", "Pleural Effusion", "Support Devices"]


# -- the work list: pure ---------------------------------------------------------------------------
def test_edit_spec_parse():
    assert EditSpec.parse("support devices = Remove") == EditSpec("Support Devices=remove", "Support Devices", "remove")
    for bad in ("Support Devices", "Support Devices=delete", "Devices=remove", "No Finding=add"):
        with pytest.raises(BatchInputError):
            EditSpec.parse(bad)


def test_parse_label():
    assert [parse_label(v, where="x") for v in ("1", "1.0", "0", "0.0", "-1", "-1.0", "", "  ", None)] == \
        [1, 1, 0, 0, -1, -1, None, None, None]
    for bad in ("2", "yes", "nan", "0.5"):
        with pytest.raises(BatchInputError, match="not 1, 0, -1 or blank"):
            parse_label(bad, where="line 2")


@pytest.mark.parametrize("labels, edit, target, reason", [
    ({"No Finding": 1, "Support Devices": 1}, "Support Devices=remove", "Chest X-ray showing No Finding", None),
    ({"Cardiomegaly": 1, "Pleural Effusion": 1, "Support Devices": 1}, "Cardiomegaly=remove",
     "Chest X-ray showing Pleural Effusion, Support Devices", None),
    # removing the last finding makes the image "No Finding" (CheXpert's rule), as in PRISM's captions
    ({"Cardiomegaly": 1, "Support Devices": 1}, "Cardiomegaly=remove", "Chest X-ray showing No Finding, Support Devices", None),
    # adding a finding clears "No Finding"
    ({"No Finding": 1, "Support Devices": 1}, "Pleural Effusion=add", "Chest X-ray showing Pleural Effusion, Support Devices", None),
    ({"Support Devices": 1}, "Support Devices=remove", NORMAL_CAPTION, None),
    ({"No Finding": 1}, "Support Devices=add", "Chest X-ray showing No Finding, Support Devices", None),
    # an uncertain other finding keeps "No Finding" off
    ({"Cardiomegaly": 1, "Edema": -1}, "Cardiomegaly=remove", NORMAL_CAPTION, None),
    ({"No Finding": 1, "Support Devices": 0}, "Support Devices=remove", None, "Support Devices is absent (0)"),
    ({"No Finding": 1}, "Support Devices=remove", None, "Support Devices is absent (blank)"),
    ({"Cardiomegaly": 1}, "Cardiomegaly=add", None, "Cardiomegaly is already present (1)"),
    ({"Cardiomegaly": -1}, "Cardiomegaly=remove", None, "Cardiomegaly is uncertain (-1)"),
    ({"Cardiomegaly": -1}, "Cardiomegaly=add", None, "Cardiomegaly is uncertain (-1)"),
])
def test_plan_edit(labels, edit, target, reason):
    planned = plan_edit(labels, EditSpec.parse(edit))
    assert (planned.target, planned.skip_reason) == (target, reason)


def test_image_id():
    assert image_id("CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg") == \
        "CheXpert-v1.0__train__patient00001__study1__view1_frontal"
    assert image_id("a b/c?.png") == "a_b__c_"
    assert image_id(".hidden.png") == "hidden"


def _write_csv(path: Path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_chexpert_csv(tmp_path):
    path = _write_csv(tmp_path / "l.csv", [["p/a.png", "1.0", "0.0", "", "1.0"], ["p/b.png", "", "1", "-1", ""]])
    tasks = read_chexpert_csv(path, tmp_path, [EditSpec.parse("Support Devices=remove"),
                                               EditSpec.parse("Cardiomegaly=remove")])
    assert [t.image_id for t in tasks] == ["p__a", "p__b"]
    assert tasks[0].path == tmp_path / "p" / "a.png"
    assert tasks[0].source == "Chest X-ray showing No Finding, Support Devices"
    assert tasks[0].targets == ["Chest X-ray showing No Finding"]
    assert tasks[1].source == "Chest X-ray showing Cardiomegaly"
    assert tasks[1].targets == [NORMAL_CAPTION]  # Pleural Effusion is uncertain, so No Finding stays off
    assert tasks[1].edits[0].skip_reason == "Support Devices is absent (blank)"


@pytest.mark.parametrize("header, rows, edit, match", [
    (["File", "No Finding"], [["a.png", "1"]], "Cardiomegaly=remove", "no 'Path' column"),
    (["Path", "Sex"], [["a.png", "F"]], "Cardiomegaly=remove", "none of the CheXpert label columns"),
    (["Path", "No Finding"], [["a.png", "1"]], "Cardiomegaly=remove", "no column for the edited label"),
    (HEADER, [["a.png", "1", "2", "", ""]], "Cardiomegaly=remove", "line 2, column 'Cardiomegaly'"),
    (HEADER, [["a.png", "1", "", "", ""], ["a.jpg", "1", "", "", ""]], "Cardiomegaly=remove", "both map to"),
    (HEADER, [], "Cardiomegaly=remove", "lists no images"),
    (HEADER, [["", "1", "", "", ""]], "Cardiomegaly=remove", "Path cell is empty"),
])
def test_read_chexpert_csv_refusals(tmp_path, header, rows, edit, match):
    path = _write_csv(tmp_path / "l.csv", rows, header)
    with pytest.raises(BatchInputError, match=match):
        read_chexpert_csv(path, tmp_path, [EditSpec.parse(edit)])


# -- jobs on the phantom engine --------------------------------------------------------------------
def _small_png(path: Path, seed: int, size=(128, 128)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[0], 0:size[1]] / max(size)
    pixels = np.clip(0.3 + 0.4 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 6) + rng.normal(0, 0.02, size), 0, 1)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Five images (three phantoms, two small synthetic PNGs, one not square) and their CSV."""
    root = tmp_path_factory.mktemp("data")
    (root / "imgs").mkdir()
    for p in PHANTOMS:
        (root / "imgs" / p.name).write_bytes(p.read_bytes())
    _small_png(root / "imgs" / "syn-a.png", 1)
    _small_png(root / "imgs" / "syn-b.png", 2, (160, 128))
    rows = [["imgs/phantom-1000003.png", "1", "0", "0", "1"],
            ["imgs/phantom-1000005.png", "1", "0", "", "1"],
            ["imgs/phantom-1000006.png", "0", "1", "1", "1"],
            ["imgs/syn-a.png", "1", "0", "0", "0"],     # both edits skipped: published with its skip rows
            ["imgs/syn-b.png", "0", "-1", "0", "1"]]   # cardiomegaly uncertain: skipped
    return root, _write_csv(root / "labels.csv", rows)


def _run(capsys, *argv):
    code = main(["batch", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _table(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_job(dataset, tmp_path_factory):
    root, labels = dataset
    out = tmp_path_factory.mktemp("jobs") / "devices"
    code = main(["batch", "--csv", str(labels), "--out", str(out), *FAST, "--group", "4",
                 "--edit", "Support Devices=remove", "--edit", "Cardiomegaly=remove", "--no-figure"])
    return code, out


def test_csv_job_end_to_end(first_job):
    code, out = first_job
    assert code == 0
    rows = _table(out)
    assert len(rows) == 5 * 2
    assert len({(r["image_id"], r["edit"]) for r in rows}) == 10
    by = {(r["image_id"], r["edit"]): r for r in rows}
    ok = by[("imgs__phantom-1000006", "Cardiomegaly=remove")]
    assert ok["status"] == "ok" and ok["target_caption"] == "Chest X-ray showing Pleural Effusion, Support Devices"
    assert (out / ok["output"] / ok["selected_file"]).is_file()
    assert float(ok["reconstruction_error"]) < 0.5
    assert by[("imgs__phantom-1000003", "Support Devices=remove")]["target_caption"] == "Chest X-ray showing No Finding"
    assert by[("imgs__phantom-1000003", "Cardiomegaly=remove")]["error"] == "Cardiomegaly is absent (0)"
    assert by[("imgs__syn-b", "Cardiomegaly=remove")]["error"] == "Cardiomegaly is uncertain (-1)"
    assert by[("imgs__syn-b", "Support Devices=remove")]["target_caption"] == NORMAL_CAPTION
    assert {r["status"] for r in rows if r["image_id"] == "imgs__syn-a"} == {"skipped"}
    assert sorted(r["status"] for r in rows).count("ok") == 5
    assert (out / "imgs__syn-a" / "result.json").is_file()  # done, with nothing to edit
    assert len(list((out / ".cache" / "inversions").glob("*.npz"))) == 4
    assert not [p for p in out.iterdir() if ".prism-" in p.name]


def test_second_job_reuses_every_inversion(first_job, dataset, capsys, tmp_path):
    _, first = first_job
    root, labels = dataset
    code, out, err = _run(capsys, "--csv", labels, "--out", tmp_path / "effusion", *FAST, "--no-figure",
                          "--cache", first / ".cache" / "inversions", "--edit", "Pleural Effusion=add",
                          "--edit", "Support Devices=remove", "--select", ENGINE / "classifier.onnx")
    assert code == 0, err
    # every image the first job inverted is reused; syn-a had no applicable edit there, so it is inverted now
    assert "inverted 1, reused 4" in out
    rows = _table(tmp_path / "effusion")
    assert len(rows) == 10 and sum(r["status"] == "ok" for r in rows) == 8  # all but "add" to 1000006's effusion
    for row in rows:  # --select: the classifier's scores of each edit (the sole candidate's, if none flips)
        assert (row["p_source"] != "" and row["p_counterfactual"] != "") == (row["status"] == "ok")
        assert not row["selected_file"] or row["selected_file"].startswith("selected-")


def test_rerun_resumes_and_other_settings_are_refused(first_job, dataset, capsys):
    _, out = first_job
    root, labels = dataset
    before = (out / "imgs__phantom-1000003").stat().st_ino
    code, stdout, err = _run(capsys, "--csv", labels, "--out", out, *FAST, "--no-figure",
                             "--edit", "Support Devices=remove", "--edit", "Cardiomegaly=remove")
    assert code == 0 and "5 of 5 images already done" in err and "inverted 0, reused 0" in stdout
    assert (out / "imgs__phantom-1000003").stat().st_ino == before
    table = (out / "results.csv").read_text()
    for changed in (["--edit", "Pleural Effusion=add"], ["--edit", "Support Devices=remove", "--guidance", "5"]):
        argv = ["--csv", labels, "--out", out, *FAST, "--no-figure", *changed]
        code, _, err = _run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: --out") and "other settings" in err
    assert (out / "results.csv").read_text() == table


def test_refusals_before_any_work(tmp_path, capsys, dataset):
    root, labels = dataset
    _write_csv(tmp_path / "nopath.csv", [["a.png", "1"]], ["File", "No Finding"])
    cases = [["--csv", tmp_path / "nopath.csv", "--edit", "Support Devices=remove"],
             ["--csv", labels, "--edit", "Devices=remove"],
             ["--csv", labels],
             ["--csv", labels, "--edit", "Cardiomegaly=remove", "--images", root / "imgs"],
             ["--images", root / "imgs", "--prompt", "Chest X-ray showing Cardiomegaly"],
             ["--csv", labels, "--edit", "Support Devices=remove", "--inversion", "ddim", "--edit-negative", "source"]]
    for argv in cases:
        code, _, err = _run(capsys, *argv, "--out", tmp_path / "out", *FAST)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert not (tmp_path / "out").exists()
    (tmp_path / "notajob").mkdir()
    (tmp_path / "notajob" / "thesis.tex").write_text("x")
    code, _, err = _run(capsys, "--csv", labels, "--edit", "Cardiomegaly=remove", "--out", tmp_path / "notajob", *FAST)
    assert code == 2 and "not a prism-rt batch folder" in err
    from prism_rt.batch_store import JobStore

    other = JobStore(tmp_path / "busy")  # another job holds this OUT
    other.lock()
    try:
        code, _, err = _run(capsys, "--csv", labels, "--edit", "Cardiomegaly=remove", "--out", tmp_path / "busy", *FAST)
        assert code == 2 and "in use by another prism-rt batch job" in err
    finally:
        other.unlock()


def test_failing_image_is_recorded_and_exit_1(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "good.png").write_bytes(PHANTOMS[0].read_bytes())
    (tmp_path / "imgs" / "corrupt.png").write_bytes(PHANTOMS[1].read_bytes()[:300])
    code, stdout, err = _run(capsys, "--images", tmp_path / "imgs", "--prompt", "Chest X-ray showing No Finding, "
                             "Support Devices", "--target", "Chest X-ray showing No Finding", "--out", tmp_path / "o",
                             *FAST, "--no-figure")
    assert code == 1
    rows = {r["image_id"]: r for r in _table(tmp_path / "o")}
    assert rows["good"]["status"] == "ok" and rows["corrupt"]["status"] == "failed"
    assert "corrupt.png" in rows["corrupt"]["error"] and "1 failed" in stdout
    assert not (tmp_path / "o" / "corrupt").exists()
    # fixed and rerun: the failure is retried, the good image is not redone
    (tmp_path / "imgs" / "corrupt.png").write_bytes(PHANTOMS[1].read_bytes())
    code, stdout, err = _run(capsys, "--images", tmp_path / "imgs", "--prompt", "Chest X-ray showing No Finding, "
                             "Support Devices", "--target", "Chest X-ray showing No Finding", "--out", tmp_path / "o",
                             *FAST, "--no-figure")
    assert code == 0 and "inverted 1, reused 0" in stdout
    assert [r["status"] for r in _table(tmp_path / "o")] == ["ok", "ok"]


# -- crash safety ------------------------------------------------------------------------------------
def _job_cmd(labels: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "prism_rt.cli", "batch", "--csv", str(labels), "--out", str(out), "--model",
            str(ENGINE), "--threads", "1", "--self-replace", "0.5", "--no-figure", "--edit", "Support Devices=remove",
            *extra]


def _many(root: Path, n: int) -> Path:
    (root / "imgs").mkdir(exist_ok=True)
    rows = []
    for k in range(n):
        name = f"img{k:02d}.png"
        if k < len(PHANTOMS):
            (root / "imgs" / name).write_bytes(PHANTOMS[k].read_bytes())
        else:
            _small_png(root / "imgs" / name, 10 + k)
        rows.append([f"imgs/{name}", "1", "0", "0", "1"])
    return _write_csv(root / "labels.csv", rows)


def _check_complete(out: Path, n: int):
    rows = _table(out)
    assert len(rows) == n and len({r["image_id"] for r in rows}) == n
    assert all(r["status"] == "ok" for r in rows)
    assert all((out / r["output"] / r["selected_file"]).is_file() for r in rows)
    assert not [p for p in out.iterdir() if ".prism-" in p.name]


def test_sigkill_then_rerun_finishes_without_redoing(tmp_path):
    labels, out = _many(tmp_path, 6), tmp_path / "out"
    proc = subprocess.Popen(_job_cmd(labels, out, "--steps", "8", "--group", "1"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "imgs__img00" / "result.json"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists()
    done_before = {p.parent.name for p in out.glob("*/result.json")}
    stamp = {(d, (out / d).stat().st_ino, (out / d / "result.json").stat().st_mtime_ns) for d in done_before}
    run = subprocess.run(_job_cmd(labels, out, "--steps", "8", "--group", "1"), cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"{len(done_before)} of 6 images already done" in run.stderr
    assert stamp == {(d, (out / d).stat().st_ino, (out / d / "result.json").stat().st_mtime_ns) for d in done_before}
    _check_complete(out, 6)


@pytest.mark.slow
def test_twelve_images_killed_twice_at_random_moments(tmp_path):
    """The issue's "must show": a 12-image job SIGKILLed twice at random moments, then rerun, gives
    the same table as an uninterrupted job (timings aside)."""
    labels = _many(tmp_path, 12)
    reference = tmp_path / "reference"
    assert subprocess.run(_job_cmd(labels, reference, "--steps", "6"), cwd=ROOT, capture_output=True,
                          timeout=300).returncode == 0
    out, rng = tmp_path / "out", random.Random(25)
    for at in sorted(rng.sample(range(1, 7), 2)):  # kill after `at` images are done, plus a random fraction of one
        proc = subprocess.Popen(_job_cmd(labels, out, "--steps", "6"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list(out.glob("*/result.json"))) < at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL  # killed mid-job, not finished
        assert len(list(out.glob("*/result.json"))) < 12
        if (out / "results.csv").exists():  # whatever the moment, the table is whole: no half or duplicate row
            rows = _table(out)
            assert len({r["image_id"] for r in rows}) == len(rows)
    run = subprocess.run(_job_cmd(labels, out, "--steps", "6"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    _check_complete(out, 12)
    timing = {"invert_s", "edit_s", "reconstruction_error"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in _table(out)]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in _table(reference)]
    total = int(re.search(r"inverted (\d+)", run.stdout).group(1))
    assert total <= 12
