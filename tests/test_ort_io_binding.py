"""onnxruntime with IO binding (issue 27 §2): the loops' arrays stay on the session's device as
torch tensors, bound to onnxruntime by pointer, outputs back through DLPack. On the CPU the same
path runs with device "cpu": the counterfactuals must equal the numpy path's bit for bit, and the
number of host copies per loop (counted as in test_device_loop) must not grow with the steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import prism_rt.engine as engine_module  # noqa: E402
from prism_rt.config import ControlConfig, OrtOptions, RunLimits  # noqa: E402
from prism_rt.errors import BackendError  # noqa: E402

from test_device_loop import HOST_READS, _counting, _original  # noqa: E402

ENGINE = Path(__file__).resolve().parents[1] / "engines" / "phantom-demo"
IMAGE = ENGINE / "images" / "phantom-1000003.png"
SOURCE, TARGET = "Chest X-ray showing No Finding, Support Devices", "Chest X-ray showing No Finding"


def _engine(io_binding):
    from prism_rt.engine import Engine

    return Engine.load(ENGINE, options=OrtOptions(io_binding=io_binding, threads=1))


def _counterfactual(engine, steps: int) -> np.ndarray:
    inversion = engine.invert(IMAGE, SOURCE, method="direct", sampler=engine.sampler(steps=steps))
    return np.stack(engine.edit(inversion, [TARGET, "Chest X-ray showing No Finding, Support"],
                                ControlConfig(blend_words=("Devices", "Finding")), RunLimits(max_batch=63)).edits)


def test_bound_arrays_equal_the_numpy_path_bit_for_bit():
    bound, plain = _engine(True), _engine(False)
    assert bound.backend.io_binding and not plain.backend.io_binding
    assert bound.backend.describe()["io_binding"] is True
    np.testing.assert_array_equal(_counterfactual(bound, 4), _counterfactual(plain, 4))
    # graph outputs are torch tensors on the device, the same values as numpy's
    ids = np.zeros((2, 77), np.int32)
    got = bound.backend.run("text_encoder", input_ids=bound.backend.asarray(ids))["hidden"]
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), plain.backend.run("text_encoder", input_ids=ids)["hidden"])


def test_bound_loops_copy_nothing_per_step(monkeypatch):
    engine = _engine(True)
    counts = {}
    for steps in (2, 5):
        inversion, edit = [], []
        monkeypatch.setattr(engine_module, "ddim_inversion", _counting(_original("ddim_inversion"), inversion))
        monkeypatch.setattr(engine_module, "edit_loop_groups", _counting(_original("edit_loop_groups"), edit))
        _counterfactual(engine, steps)
        counts[steps] = (inversion[0], edit[0])
    assert counts[2] == counts[5], counts
    assert sum(e in HOST_READS for e in counts[5][0]) == 1 and sum(e in HOST_READS for e in counts[5][1]) == 1


def test_bound_inputs_are_checked_like_numpy_ones():
    engine = _engine(True)
    with pytest.raises(BackendError, match=r"must have shape \[.batch., 4, 'latent_height', 'latent_width'\]"):
        engine.backend.run("vae_decoder", latents=torch.zeros(1, 4, 16))


def test_io_binding_is_refused_where_it_cannot_apply(tiny_model_dir, monkeypatch, capsys, tmp_path):
    from prism_rt import cli
    from prism_rt.ort_backend import OrtDevice, _BoundArrays

    code = cli.main(["edit", "--model", str(tiny_model_dir), "--image", str(IMAGE), "--prompt", SOURCE,
                     "--target", TARGET, "--out", str(tmp_path / "out"), "--io-binding"])
    assert code != 0 and "--io-binding applies to engine folders" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="CUDA build of torch"):
        _BoundArrays.make(OrtDevice.CUDA, 0, True)
    assert _BoundArrays.make(OrtDevice.CUDA, 0, None) is None  # the default falls back to numpy arrays


def test_each_stage_is_an_nvtx_range(monkeypatch):
    """The engine's stages open NVTX ranges (recorded here in place of torch.cuda.nvtx), in order."""
    import contextlib

    import prism_rt.nvtx

    opened = []
    monkeypatch.setattr(prism_rt.nvtx, "nvtx_range", lambda name: opened.append(name) or contextlib.nullcontext())
    engine = _engine(False)
    inversion = engine.invert(IMAGE, SOURCE, method="direct", sampler=engine.sampler(steps=2))
    engine.edit(inversion, [TARGET], ControlConfig(self_replace=(0.5,), noise_blend=True), RunLimits(max_batch=63))
    assert opened == ["prism_rt.encode", "prism_rt.ddim_inversion", "prism_rt.encode", "prism_rt.noise_blend",
                      "prism_rt.edit_loop", "prism_rt.decode"]
