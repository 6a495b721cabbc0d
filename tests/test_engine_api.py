"""The Python API: two constructors, the backend's own default inversion, results that save
themselves and come back at the input's geometry."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prism_rt import Engine, OrtOptions, Precision
from prism_rt.errors import BackendError, SettingsError
from prism_rt.result import RECONSTRUCTION_WARNING, EditResult

ENGINE = Path(__file__).resolve().parent.parent / "engines" / "phantom-demo"
SOURCE = "Chest X-ray showing No Finding, Support Devices"
TARGET = "Chest X-ray showing No Finding"


@pytest.fixture(scope="module")
def engine():
    return Engine.from_dir(ENGINE, precision="fp32", options=OrtOptions(threads=1))


def test_from_dir_runs_onnxruntime_and_inverts_directly(engine):
    assert engine.backend.kind.value == "onnxruntime"
    assert engine.default_inversion.value == "direct"
    assert engine.backend.describe()["precision"] == "fp32"


def test_load_picks_the_constructor_by_the_manifest(engine):
    loaded = Engine.load(ENGINE, threads=1)
    assert loaded.backend.kind is engine.backend.kind
    with pytest.raises(BackendError, match="engine folder"):
        Engine.load(ENGINE, backend="torch")
    with pytest.raises(BackendError, match="not an engine folder"):
        Engine.load(ENGINE / "images", backend="onnxruntime")
    with pytest.raises(BackendError, match="not available"):
        Engine.load(ENGINE, backend="tensorrt")


def test_precision_is_one_enum():
    assert Precision.parse("INT8-CPU") is Precision.INT8_CPU
    assert Precision.INT8_CPU.folder == "onnx-int8-cpu" and Precision.FP32.folder == "onnx"
    assert Precision.INT8.symmetric and not Precision.INT8_CPU.symmetric and Precision.INT8_CPU.quantized
    with pytest.raises(SettingsError, match="int4"):
        Precision.parse("int4")
    with pytest.raises(SettingsError):
        Engine.from_dir(ENGINE, precision="int4")


def test_a_result_saves_itself_and_returns_to_the_input_geometry(engine, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = np.clip(0.5 + 0.1 * rng.standard_normal((90, 130)), 0, 1).astype(np.float32)  # not the model's square
    inversion = engine.invert(image, SOURCE, sampler=engine.sampler(steps=4), fit="pad")
    assert inversion.method.value == "direct"
    from prism_rt.config import ControlConfig

    result = engine.edit(inversion, [TARGET], ControlConfig(self_replace=(0.5, 0.8)))
    assert result.warnings == []  # direct inversion reconstructs exactly
    at_input = result.images()
    assert [a.shape for a in at_input] == [(90, 130)] * 2
    model = result.images("model")
    size = engine.backend.info.image_size
    assert model[0].shape == (size, size)
    np.testing.assert_allclose(model[0], (result.edits[0].mean(0) + 1) / 2, atol=1e-6)
    assert result.reconstruction_image().shape == (90, 130)

    out = result.save(tmp_path / "result")
    names = {p.name for p in out.iterdir()}
    assert names == {"edit-1-s0.50.png", "edit-1-s0.80.png", "result.json", "figure.png"}
    with Image.open(out / "edit-1-s0.50.png") as png:
        assert png.size == (130, 90)
        written = np.asarray(png, np.float32) / 255.0
    assert np.abs(written - at_input[0]).max() <= 0.5 / 255 + 1e-6  # the same image, rounded to 8 bits
    assert json.loads((out / "result.json").read_text())["source_prompt"] == SOURCE


def test_a_bad_reconstruction_is_reported():
    item_free = dict(items=(), reconstruction=np.zeros((3, 4, 4), np.float32), edits=[], masks=[], counts={}, timings={})
    assert EditResult(reconstruction_error=0.01, **item_free).warnings == []
    warned = EditResult(reconstruction_error=47.0, **item_free)
    assert len(warned.warnings) == 1 and "47" in warned.warnings[0] and RECONSTRUCTION_WARNING < 47


def test_edit_refuses_an_empty_target_list(engine):
    inversion = engine.invert(np.full((64, 64), 0.5, np.float32), SOURCE, sampler=engine.sampler(steps=2))
    with pytest.raises(SettingsError, match="at least one"):
        engine.edit(inversion, [])
