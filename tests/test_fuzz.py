"""load_image on a few hundred mutated PNG/JPEG/DICOM files: it loads or raises a PrismError
with one line naming the file, and nothing else (benchmarks/fuzz_inputs.py runs thousands)."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", ROOT / "benchmarks" / "fuzz_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [0, 1])
def test_mutated_inputs_load_or_raise_one_typed_line(tmp_path, seed):
    pytest.importorskip("pydicom")
    fuzz = _fuzz_module()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a library warning escaping load_image would print lines of its own
        counts, rows = fuzz.run(300, seed, tmp_path)
    broken = [(name, result, message) for _, name, result, message in rows
              if result.startswith(("UNTYPED", "BAD"))]
    assert not broken, broken[:5]
    assert counts["loaded"] > 20 and counts["InputImageError"] > 50, counts  # both paths exercised


def test_seeds_cover_every_reader_and_load(tmp_path):
    pytest.importorskip("pydicom")
    fuzz = _fuzz_module()
    seeds = fuzz.seed_files()
    assert {Path(n).suffix for n in seeds} == {".png", ".jpg", ".dcm"}
    for name, data in seeds.items():
        (tmp_path / name).write_bytes(data)
        assert fuzz.outcome(tmp_path / name) == ("loaded", ""), name
