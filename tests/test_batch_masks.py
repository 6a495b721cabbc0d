"""prism-rt batch with user masks: a CSV's KeepMask / EditMask columns and --keep-mask FILE|DIR give
each image its masks; the job's counterfactuals equal `prism-rt edit` with the same mask; a missing
mask is refused before any work, a mask of the wrong size fails that image only."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from prism_rt.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engines" / "phantom-demo"
PHANTOMS = sorted((ENGINE / "images").glob("phantom-100000?.png"))
FAST = ["--model", str(ENGINE), "--steps", "4", "--self-replace", "0.5", "--threads", "1", "--no-figure",
        "--no-progress"]
SOURCE, TARGET = "Chest X-ray showing No Finding, Support Devices", "Chest X-ray showing No Finding"


def _mask(path: Path, size=(128, 128)) -> Path:
    """White over the left half (the patient's right lung side), 8-bit."""
    pixels = np.zeros(size, np.uint8)
    pixels[:, : size[1] // 2] = 255
    Image.fromarray(pixels).save(path)
    return path


def _dataset(root: Path, keep_cells: list[str]) -> Path:
    (root / "imgs").mkdir(parents=True)
    for p in PHANTOMS:
        (root / "imgs" / p.name).write_bytes(p.read_bytes())
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Path", "No Finding", "Support Devices", "KeepMask"])
        for p, cell in zip(PHANTOMS, keep_cells):
            writer.writerow([f"imgs/{p.name}", "1", "1", cell])
    return root / "labels.csv"


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_csv_keep_mask_column_equals_prism_rt_edit(tmp_path, capsys):
    _mask(tmp_path / "lung.png")
    labels = _dataset(tmp_path, ["lung.png", "", ""])
    out = tmp_path / "job"
    code = main(["batch", "--csv", labels, "--out", out, *FAST, "--group", "1", "--edit", "Support Devices=remove"])
    assert code == 0, capsys.readouterr().err
    for k, phantom in enumerate(PHANTOMS[:2]):  # with the keep mask, and without
        ref = tmp_path / f"edit{k}"
        argv = ["edit", "--image", phantom, "--prompt", SOURCE, "--target", TARGET, "--out", ref, *FAST]
        assert main(argv + (["--keep-mask", tmp_path / "lung.png"] if k == 0 else [])) == 0
        ours = _png(out / f"imgs__{phantom.stem}" / "edit-1-s0.50.png")
        assert np.array_equal(ours, _png(ref / "edit-1-s0.50.png")), phantom.name
    # and the mask did act: without it, the first image's counterfactual differs inside the kept half
    plain = tmp_path / "plain"
    assert main(["edit", "--image", PHANTOMS[0], "--prompt", SOURCE, "--target", TARGET, "--out", plain, *FAST]) == 0
    masked = _png(out / f"imgs__{PHANTOMS[0].stem}" / "edit-1-s0.50.png").astype(np.int64)
    free = _png(plain / "edit-1-s0.50.png").astype(np.int64)
    assert np.abs(masked - free)[:, :64].max() > 0


def test_keep_mask_folder_and_refusals(tmp_path, capsys):
    labels = _dataset(tmp_path, ["", "", ""])
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in PHANTOMS[:2]:
        _mask(masks / p.name)
    argv = ["batch", "--csv", labels, *FAST, "--edit", "Support Devices=remove"]
    # a folder without a mask for every image: refused before any work
    assert main([*argv, "--out", tmp_path / "a", "--keep-mask", masks]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --keep-mask") and PHANTOMS[2].name in err and err.count("\n") == 1
    assert not (tmp_path / "a" / "job.json").exists()
    # a CSV cell naming a file that is not there: refused before any work
    bad = _dataset(tmp_path / "b", ["nowhere.png", "", ""])
    assert main(["batch", "--csv", bad, *FAST, "--edit", "Support Devices=remove", "--out", tmp_path / "b" / "o"]) == 2
    err = capsys.readouterr().err
    assert "column 'KeepMask'" in err and "nowhere.png" in err
    # a mask of another size: that image fails (recorded), the others are done, exit 1
    _mask(masks / PHANTOMS[2].name, size=(64, 64))
    assert main([*argv, "--out", tmp_path / "c", "--keep-mask", masks]) == 1
    with open(tmp_path / "c" / "results.csv", newline="") as f:
        rows = {r["image_id"]: r for r in csv.DictReader(f)}
    assert [rows[f"imgs__{p.stem}"]["status"] for p in PHANTOMS] == ["ok", "ok", "failed"]
    assert "mask" in rows[f"imgs__{PHANTOMS[2].stem}"]["error"].lower()


def test_rerun_redoes_an_image_whose_mask_changed(tmp_path, capsys):
    labels = _dataset(tmp_path, ["", "", ""])
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in PHANTOMS:
        _mask(masks / p.name)
    argv = ["batch", "--csv", labels, *FAST, "--edit", "Support Devices=remove", "--out", tmp_path / "o",
            "--keep-mask", masks]
    assert main(argv) == 0
    capsys.readouterr()
    kept = {p.stem: (tmp_path / "o" / f"imgs__{p.stem}").stat().st_ino for p in PHANTOMS}
    flipped = _png(masks / PHANTOMS[1].name)[:, ::-1].copy()  # now the other half is kept
    Image.fromarray(flipped).save(masks / PHANTOMS[1].name)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "1 done image(s) have other mask files now" in err and "2 of 3 images already done" in err
    now = {p.stem: (tmp_path / "o" / f"imgs__{p.stem}").stat().st_ino for p in PHANTOMS}
    assert [now[p.stem] == kept[p.stem] for p in PHANTOMS] == [True, False, True]
    ref = tmp_path / "ref"
    assert main(["edit", "--image", PHANTOMS[1], "--prompt", SOURCE, "--target", TARGET, "--out", ref, *FAST,
                 "--keep-mask", masks / PHANTOMS[1].name]) == 0
    assert np.array_equal(_png(tmp_path / "o" / f"imgs__{PHANTOMS[1].stem}" / "edit-1-s0.50.png"),
                          _png(ref / "edit-1-s0.50.png"))
    with open(tmp_path / "o" / "results.csv", newline="") as f:
        digests = [r["masks"] for r in csv.DictReader(f)]
    assert len(set(digests)) == 2 and "" not in digests  # images 0 and 2 share their mask, image 1 has its own
