"""User masks (keep / edit, as RadEdit has them): the latents inside a keep mask follow the source
branch at every step, the decoded counterfactual there is the reconstruction, an edit mask confines
the edit, and bad mask files are refused with a typed error that says what to do.

The keep test runs the bundled demo engine (a VAE trained on phantoms; a random VAE's decoder moves
pixels anywhere), the others the tiny random model on torch, so both backends' loops are covered."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion

from pathlib import Path

from prism_rt.config import ControlConfig, OrtOptions
from prism_rt.engine import Engine
from prism_rt.errors import MaskError
from prism_rt.imageio import load_image
from prism_rt.user_masks import UserMasks

H, W = 160, 128  # not the model's square: resize fit maps 10 input rows and 8 columns to one latent cell
STEPS = 10
SOURCE = "chest x-ray of a patient with support devices"
TARGET = "chest x-ray of a patient without support devices"
DEMO = Path(__file__).resolve().parents[1] / "engines" / "phantom-demo"


def _image() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    return (0.5 + 0.3 * np.sin(5 * x) * np.cos(3 * y) + 0.15 * np.exp(-((x - 0.5) ** 2 + (y - 0.6) ** 2) / 0.02)).clip(0, 1)


def _lungs() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    left = ((x - 0.3 * W) / (0.17 * W)) ** 2 + ((y - 0.45 * H) / (0.3 * H)) ** 2 < 1
    right = ((x - 0.72 * W) / (0.15 * W)) ** 2 + ((y - 0.45 * H) / (0.3 * H)) ** 2 < 1
    return left | right


def _latent_cells(mask: np.ndarray) -> np.ndarray:
    """Independently of the engine: a latent cell holds the input pixels rows 10i…10i+9, columns
    8j…8j+7 (160×128 resized to 128×128, latent 16×16); it is touched when any of them is set."""
    return mask.reshape(16, H // 16, 16, W // 16).any(axis=(1, 3))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(tiny_model_dir, backend="torch")


@pytest.fixture(scope="module")
def inversion(engine):
    return engine.invert(_image(), SOURCE, method="direct", sampler=engine.sampler(steps=STEPS))


def _edit_recording(engine, inversion, monkeypatch, target=TARGET, **masks):
    """The edit, and the latents [source, edit] the UNet saw at each step after the first plus the
    final ones the decoder got: every state of the loop after a blend."""
    run, seen, decoded = engine.backend.run, [], []

    def recording(graph, **inputs):
        if graph == "unet":
            seen.append(engine.backend.to_numpy(inputs["latents"])[-2:])
        if graph == "vae_decoder":
            decoded.append(engine.backend.to_numpy(inputs["latents"])[0])
        return run(graph, **inputs)

    monkeypatch.setattr(engine.backend, "run", recording)
    result = engine.edit(inversion, [target], ControlConfig(self_replace=(0.5,), composite=()), **masks)
    monkeypatch.undo()
    return result, seen[1:] + [np.stack(decoded[:2])]


def test_keep_mask_pins_latents_every_step_and_pixels(monkeypatch, tmp_path):
    """The demo's device removal with the lungs kept. The latents inside the (latent-resolution)
    mask are the source's at every step. Decoded as they are, the counterfactual still moves up to
    54/255 inside the mask 8 px from its edge and 29/255 at 12 px (measured: the decoder reaches
    across latent cells), so the engine pastes the reconstruction there: what the user gets is
    within 1/255 of the reconstruction inside the mask eroded by 2 px (the bicubic resampling back
    to the input's geometry), and the edit still acts outside."""
    engine = Engine.from_dir(DEMO, options=OrtOptions(threads=2))
    demo = Image.fromarray(load_image(DEMO / "images" / "phantom-1000003.png").pixels).resize((W, H), Image.Resampling.BICUBIC)
    inversion = engine.invert(np.clip(np.asarray(demo), 0, 1), "Chest X-ray showing No Finding, Support Devices", method="direct",
                              sampler=engine.sampler(steps=STEPS))
    lungs = _lungs()
    Image.fromarray((lungs * 255).astype(np.uint8)).save(tmp_path / "lungs.png")
    result, states = _edit_recording(engine, inversion, monkeypatch, target="Chest X-ray showing No Finding",
                                     keep_mask=tmp_path / "lungs.png")
    kept = _latent_cells(lungs)
    assert 0.2 < kept.mean() < 0.8 and len(states) == STEPS
    for step, (source, edit) in enumerate(states):
        np.testing.assert_array_equal(edit[:, kept], source[:, kept], err_msg=f"step {step}")
    assert np.abs(states[-1][1] - states[-1][0])[:, ~kept].max() > 1e-1  # the edit did act outside the mask

    out = np.abs(result.images("input")[0] - result.reconstruction_image("input"))
    assert out[binary_erosion(lungs, iterations=2)].max() <= 1 / 255
    assert out[~lungs].max() > 0.1


def test_edit_mask_confines_the_edit(engine, inversion, monkeypatch):
    region = np.zeros((H, W), np.uint8)
    region[40:100, 30:90] = 255
    _, states = _edit_recording(engine, inversion, monkeypatch, edit_mask=region)
    cells = _latent_cells(region > 0)
    for step, (source, edit) in enumerate(states):
        np.testing.assert_array_equal(edit[:, ~cells], source[:, ~cells], err_msg=f"step {step}")
    assert np.abs(states[-1][1] - states[-1][0])[:, cells].max() > 1e-2


def test_both_masks_and_no_masks(engine, inversion, monkeypatch):
    """Keep wins over edit; without masks the loop is the plain one (the edit changes everywhere)."""
    edit = np.ones((H, W), bool)
    _, states = _edit_recording(engine, inversion, monkeypatch, keep_mask=_lungs(), edit_mask=edit)
    kept = _latent_cells(_lungs())
    np.testing.assert_array_equal(states[-1][1][:, kept], states[-1][0][:, kept])
    _, free = _edit_recording(engine, inversion, monkeypatch)
    assert np.abs(free[-1][1] - free[-1][0])[:, kept].max() > 1e-2


def test_bad_masks_are_refused_with_what_to_do(tmp_path, engine, inversion):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(MaskError, match="keep mask .*broken.png"):
        UserMasks.read(keep=broken, image_shape=(H, W))
    with pytest.raises(MaskError, match=r"no such file"):
        UserMasks.read(edit=tmp_path / "missing.png", image_shape=(H, W))
    small = tmp_path / "small.png"
    Image.fromarray(np.full((50, 40), 255, np.uint8)).save(small)
    with pytest.raises(MaskError, match=r"40×50 .* image is 128×160; draw the mask on the input image"):
        UserMasks.read(keep=small, image_shape=(H, W))
    with pytest.raises(MaskError, match="empty .*paint the region that must not change white"):
        UserMasks.read(keep=np.zeros((H, W)), image_shape=(H, W))
    with pytest.raises(MaskError, match="covers the whole edit mask"):
        UserMasks.read(keep=np.ones((H, W)), edit=_lungs(), image_shape=(H, W))
    with pytest.raises(MaskError, match="per image"):
        engine.edit_many([inversion], [TARGET], keep_masks=[_lungs(), _lungs()])
    with pytest.raises(MaskError, match=r"is 40×50"):  # through the API, before any model work
        engine.edit(inversion, [TARGET], keep_mask=small)


def _cli(tmp_path, *extra):
    from prism_rt.cli import main

    return main(["edit", "--model", str(DEMO), "--image", str(DEMO / "images" / "phantom-1000003.png"),
                 "--prompt", "Chest X-ray showing No Finding, Support Devices", "--target", "Chest X-ray showing No Finding",
                 "--out", str(tmp_path / "out"), "--no-progress", "--steps", "5", "--self-replace", "0.5",
                 "--dicom-out", "off", "--extras", *extra])


def test_cli_keep_mask(tmp_path, capsys, monkeypatch):
    """`prism-rt edit --keep-mask`: a bad mask is one error line before the model loads; a good one
    leaves the written counterfactual equal to the written reconstruction inside it."""
    import prism_rt.engine

    keep = np.zeros((128, 128), np.uint8)
    keep[20:100, 10:60] = 255
    Image.fromarray(keep[:100]).save(tmp_path / "short.png")
    Image.fromarray(keep).save(tmp_path / "keep.png")
    load = prism_rt.engine.Engine.load
    monkeypatch.setattr(prism_rt.engine.Engine, "load", lambda *a, **k: pytest.fail("the model loaded before the mask check"))
    for bad, message in (("short.png", "is 128×100 pixels"), ("missing.png", "no such file")):
        assert _cli(tmp_path, "--keep-mask", str(tmp_path / bad)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    monkeypatch.setattr(prism_rt.engine.Engine, "load", load)
    assert _cli(tmp_path, "--keep-mask", str(tmp_path / "keep.png")) == 0
    change = np.abs(load_image(tmp_path / "out" / "edit-1-s0.50.png").pixels
                    - load_image(tmp_path / "out" / "reconstruction.png").pixels)
    assert change[binary_erosion(keep > 0, iterations=1)].max() <= 1 / 255 and change[keep == 0].max() > 0.05


def test_edit_many_with_masks_on_some_images_equals_editing_each_alone():
    """A batch where one image has a keep mask and the other none gives each image what editing
    it alone gives (the maskless one is blended with a region of ones: the plain edit)."""
    engine = Engine.from_dir(DEMO, options=OrtOptions(threads=2))
    sampler = engine.sampler(steps=5)
    images = [load_image(DEMO / "images" / f"phantom-{n}.png").pixels for n in (1000003, 1000005)]
    inversions = [engine.invert(im, "Chest X-ray showing No Finding, Support Devices", method="direct", sampler=sampler)
                  for im in images]
    keep = np.zeros((128, 128), bool)
    keep[10:70, 20:100] = True
    control, target = ControlConfig(self_replace=(0.5,)), ["Chest X-ray showing No Finding"]
    both = engine.edit_many(inversions, target, control, keep_masks=[keep, None])
    alone = [engine.edit(inversions[0], target, control, keep_mask=keep), engine.edit(inversions[1], target, control)]
    for got, want in zip(both, alone):
        np.testing.assert_allclose(got.edits[0], want.edits[0], atol=1e-4)
    assert np.abs(both[0].edits[0] - both[1].edits[0]).max() > 0.1
    np.testing.assert_array_equal(both[0].edits[0][:, keep], both[0].reconstruction[:, keep])
    # rows 10…69 and columns 20…99 touch latent rows 1…8 and columns 2…12: 8 × 11 cells kept
    assert both[0].settings["user_masks_editable_fraction"] == 1 - 8 * 11 / 256
    assert both[1].settings["user_masks_editable_fraction"] == 1.0 and alone[1].settings["user_masks_editable_fraction"] is None


def test_triton_service_takes_masks_as_optional_inputs():
    """serve_model.EditService (what `prism-rt serve` and the Triton repository run): a keep_mask
    tensor gives the Python API's masked counterfactual bit for bit; a mask of another size is
    that request's error."""
    from prism_rt.imageio import to_uint
    from prism_rt.serve_model import EditService

    engine = Engine.from_dir(DEMO, options=OrtOptions(threads=2))
    levels = np.round(load_image(DEMO / "images" / "phantom-1000003.png").pixels * 65535).astype(np.uint16)
    keep = np.zeros(levels.shape, np.uint8)
    keep[10:70, 20:100] = 1
    params = {"inversion": "direct", "steps": 5, "self_replace": 0.5}
    request = {"image": levels[None], "prompt": np.array([[b"Chest X-ray showing No Finding, Support Devices"]], object),
               "targets": np.array([[b"Chest X-ray showing No Finding"]], object),
               "params": np.array([[json.dumps(params).encode()]], object), "keep_mask": keep[None]}
    answers = EditService(engine)([request, dict(request, keep_mask=keep[None, :64])])
    inversion = engine.invert(levels / 65535.0, "Chest X-ray showing No Finding, Support Devices", method="direct",
                              sampler=engine.sampler(steps=5))
    want = engine.edit(inversion, ["Chest X-ray showing No Finding"], ControlConfig(self_replace=(0.5,)), keep_mask=keep)
    np.testing.assert_array_equal(answers[0]["counterfactuals"][0, 0], to_uint(want.images("input")[0], 16))
    assert "keep_mask must be [1, H, W] like the image" in answers[1]["error"]
