"""``edit_negative``: the edit items' classifier-free guidance steered away from the source caption.

Closed form: CFG is ``ε_neg + w·(ε_c − ε_neg)``. With the source caption as the negative and the
source caption as the target, every step's edit noise is ``ε(c_src)`` whatever ``w`` is, which is
exactly what guidance 1 with the empty negative gives (``ε_∅ + 1·(ε_c − ε_∅) = ε_c``), with the
attention control neutral (it acts on the conditional half only). The source item is pinned to the inversion path (direct) in both runs, so the two edits must agree; with the
empty negative at the same guidance they must not (the test can fail)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from prism_rt.config import ControlConfig
from prism_rt.engine import Engine
from prism_rt.errors import SettingsError

STEPS = 8
DEMO = Path(__file__).resolve().parents[1] / "engines" / "phantom-demo"
SOURCE, TARGET = "Chest X-ray showing No Finding, Support Devices", "Chest X-ray showing No Finding"


def _image() -> np.ndarray:
    y, x = np.mgrid[0:128, 0:128] / 128.0
    return (0.5 + 0.3 * np.sin(5 * x) * np.cos(3 * y)).clip(0, 1)


@pytest.fixture(scope="module", params=["torch-tiny", "onnxruntime-demo"])
def engine(request, tiny_model_dir):
    """Both loops: the tiny random model on torch, the bundled demo engine on onnxruntime."""
    if request.param == "torch-tiny":
        return Engine.load(tiny_model_dir, backend="torch")
    return Engine.load(DEMO, threads=2)


@pytest.fixture(scope="module")
def inversion(engine):
    image = _image() if engine.backend.kind.value == "torch" else DEMO / "images" / "phantom-1000003.png"
    return engine.invert(image, SOURCE, method="direct", sampler=engine.sampler(steps=STEPS, guidance=7.5))


def _edit(engine, inversion, target, guidance, negative, **control):
    inv = dataclasses.replace(inversion, sampler=dataclasses.replace(inversion.sampler, guidance=guidance))
    control = {"self_replace": (0.5,), **control}
    return engine.edit(inv, [target], ControlConfig(edit_negative=negative, **control)).edits[0]


NEUTRAL = {"self_replace": (0.0,), "cross_replace": 0.0, "edit_weight": None}
"""Attention control acts on the conditional half only; neutral, both halves see the same maps."""


def test_source_negative_is_cfg_along_the_caption_difference(engine, inversion):
    guided = _edit(engine, inversion, SOURCE, 7.5, "source", **NEUTRAL)
    unguided = _edit(engine, inversion, SOURCE, 1.0, "empty", **NEUTRAL)
    np.testing.assert_allclose(guided, unguided, atol=1e-4)
    assert np.abs(_edit(engine, inversion, SOURCE, 7.5, "empty", **NEUTRAL) - unguided).max() > 1e-2


def test_source_negative_changes_a_real_edit_and_keeps_the_source_path(engine, inversion):
    control = ControlConfig(self_replace=(0.5,), edit_negative="source")
    result = engine.edit(inversion, [TARGET], control)
    assert result.reconstruction_error == 0.0  # direct: the source item is still pinned to its path
    assert np.abs(result.edits[0] - _edit(engine, inversion, TARGET, 7.5, "empty")).max() > 1e-2


@pytest.mark.parametrize("method", ["null-text", "ddim"])
def test_source_negative_refused_where_the_source_is_guided(method):
    with pytest.raises(SettingsError, match="direct or negative-prompt"):
        ControlConfig(edit_negative="source").check_inversion(method)
    ControlConfig(edit_negative="source").check_inversion("direct")
    ControlConfig(edit_negative="source").check_inversion("negative-prompt")
    ControlConfig().check_inversion(method)


def test_source_negative_refused_on_a_ddim_inversion_before_any_unet_call(engine, monkeypatch):
    inversion = engine.invert(_image(), SOURCE, method="ddim", sampler=engine.sampler(steps=2))
    calls = []
    monkeypatch.setattr(engine.backend, "run", lambda graph, **inputs: calls.append(graph))
    with pytest.raises(SettingsError, match="needs direct or negative-prompt"):
        engine.edit(inversion, [TARGET], ControlConfig(edit_negative="source"))
    assert calls == []


@pytest.mark.parametrize("kwargs", [{"edit_negative": "src"}, {"edit_negative": ""},
                                    {"edit_negative": "source", "legacy": True}])
def test_bad_edit_negative_is_refused(kwargs):
    with pytest.raises(SettingsError, match="edit_negative"):
        ControlConfig(**kwargs)


def test_the_c_abi_options_carry_edit_negative_and_refuse_it_before_inverting(monkeypatch):
    """``prism_edit``'s options JSON (the C ABI's Python side): the setting reaches the edit, and a
    source negative on a ddim inversion is refused before the image is inverted."""
    from prism_rt import c_api

    engine = Engine.load(DEMO, threads=1)
    image = str(DEMO / "images" / "phantom-1000003.png")
    seen = []
    monkeypatch.setattr(engine, "edit", lambda inversion, targets, control, limits: seen.append(control) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        c_api.edit(engine, image, None, 0, 0, 0, SOURCE, [TARGET], '{"steps": 2, "edit_negative": "source"}')
    assert seen[0].edit_negative == "source"
    monkeypatch.setattr(engine, "invert", lambda *a, **k: pytest.fail("inverted before the options were checked"))
    with pytest.raises(SettingsError, match="needs direct or negative-prompt"):
        c_api.edit(engine, image, None, 0, 0, 0, SOURCE, [TARGET], '{"inversion": "ddim", "edit_negative": "source"}')
