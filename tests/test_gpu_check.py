"""The prepared GPU check (``benchmarks/gpu_check.sh``, issue 27 §3) runs end to end on the CPU in
its dry mode (tiny model, 2 steps): every stage's row is there with finite figures, the parity of
fp16 against fp32 is computed, and the markdown table holds every row."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_json_and_table(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry", "--repeats", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry"] is True and report["steps"] == 2 and report["environment"]["device"] == "cpu"
    rows = report["rows"]
    by_what = {}
    for row in rows:
        by_what.setdefault(row["what"], []).append(row)
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value) or key == "psnr_db_min", (row, key)
    steps = by_what["controlled UNet CFG step"]
    assert {(r["precision"], r["batch"], r["mode"]) for r in steps} == {
        ("fp16", 2, "eager"), ("fp16", 2, "cuda-graph"), ("fp16", 2, "channels-last"), ("fp16", 12, "eager"), ("fp16", 12, "cuda-graph"),
        ("fp16", 12, "channels-last"),
        ("fp32", 2, "eager"), ("fp32", 12, "eager")}
    assert all(r["median_ms"] > 0 and r["captured"] is False for r in steps)  # no CUDA: static buffers, no capture
    stock = by_what["diffusers stock UNet CFG step"]
    assert {(r["batch"], r["mode"]) for r in stock} == {(2, "eager"), (2, "cuda-graph"), (12, "eager"), (12, "cuda-graph")}
    assert all(r["controlled_over_stock"] > 0 for r in stock)
    parity = by_what["UNet fp16 vs fp32"]
    assert {r["batch"] for r in parity} == {2, 12}
    assert all(0 < r["max_rel"] < 0.05 and 0 < r["rms_rel"] < 0.05 for r in parity)  # fp16 differs, but not by much
    runs = by_what["one counterfactual (direct inversion + 5-value sweep in one batch)"]
    assert {(r["precision"], r["mode"]) for r in runs} == {("fp16", "eager"), ("fp16", "cuda-graph"), ("fp32", "eager")}
    assert all(r["values"] == 5 and r["seconds"] > 0 and r["peak_mb"] > 0 and r["unet_items"] > 0 for r in runs)
    cf = by_what["counterfactual fp16 vs fp32"][0]
    assert 0 < cf["max_abs"] < 0.5 and 20 < cf["psnr_db_min"] < 200
    # the static-buffer path runs the same module on the same values: identical counterfactuals
    assert by_what["counterfactual cuda-graph vs eager (fp16)"][0]["max_abs"] == 0.0
    table = (out / "gpu_check.md").read_text().splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("| what"))
    assert len(table) - header - 2 == len(rows)
    assert "controlled_over_stock" in table[header] and "psnr_db_min" in table[header]


def test_gpu_check_refuses_without_cuda_unless_dry(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the real check would run")
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "export")]
    from prism_bench import gpu_check

    assert gpu_check.main([str(tmp_path / "out"), "--repeats", "1"]) == 2


def test_prune_wheel_drops_unkept_subpackages_and_their_record_lines(tmp_path):
    import zipfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from prune_wheel import prune

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {"pkg/__init__.py": "", "pkg/models/__init__.py": "lazy", "pkg/models/clip/m.py": "keep",
             "pkg/models/bert/m.py": "drop" * 1000, "pkg/other/x.py": "x"}
    record = "".join(f"{name},sha256=0,1\n" for name in files) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in {**files, "pkg-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    before, after = prune(wheel, "pkg/models", {"clip"})
    assert after < before
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        kept_record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert names == {"pkg/__init__.py", "pkg/models/__init__.py", "pkg/models/clip/m.py", "pkg/other/x.py",
                     "pkg-1.0.dist-info/RECORD"}
    assert "bert" not in kept_record and "pkg/models/clip/m.py" in kept_record and "pkg/other/x.py" in kept_record
