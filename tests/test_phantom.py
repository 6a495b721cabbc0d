"""Procedural chest radiograph phantoms (prism_export.phantom) and the train-phantom smoke run."""
import json
from dataclasses import replace

import numpy as np
import pytest

from prism_export.phantom import (
    ATTRIBUTES, HELDOUT_SEED0, Attributes, counterfactuals, measure_ctr, render, render_image, sample_attributes,
    sample_patient, write_phantom_set,
)
from prism_rt.captions import chexpert_caption

NONE = Attributes()


def _pair(seed):
    return sample_patient(seed), sample_attributes(seed)


def test_deterministic():
    for seed in (0, 17, HELDOUT_SEED0 + 3):
        p1, a1 = _pair(seed)
        p2, a2 = _pair(seed)
        assert p1 == p2 and a1 == a2
        r1, r2 = render(p1, a1), render(p2, a2)
        assert r1.image.dtype == np.float32 and r1.image.shape == (128, 128)
        assert 0.0 <= r1.image.min() and r1.image.max() <= 1.0
        np.testing.assert_array_equal(r1.image, r2.image)
        for name in ATTRIBUTES:
            np.testing.assert_array_equal(r1.masks[name], r2.masks[name])


def test_different_seeds_differ():
    a = render_image(sample_patient(1), NONE)
    b = render_image(sample_patient(2), NONE)
    assert np.abs(a - b).mean() > 0.02
    assert sample_patient(1) != sample_patient(2)


@pytest.mark.parametrize("seed", [0, 5, 11, HELDOUT_SEED0])
def test_devices_change_only_inside_mask(seed):
    p, at = _pair(seed)
    at = replace(at, devices=False)
    off = render(p, at)
    on = render(p, replace(at, devices=True))
    diff = on.image - off.image
    mask = off.masks["devices"]
    np.testing.assert_array_equal(mask, on.masks["devices"])
    assert np.all(diff[~mask] == 0.0)  # exactly the same patient outside the device
    assert (np.abs(diff) > 0.05).sum() >= 20  # and the device is visible
    assert mask.mean() < 0.25


def test_every_attribute_mask_bounds_its_change():
    p, at = _pair(3)
    ph = render(p, at)
    for name, cf in counterfactuals(p, at).items():
        assert np.all(cf.image[~ph.masks[name]] == ph.image[~ph.masks[name]]), name
        assert (cf.image != ph.image).any(), name


@pytest.mark.parametrize("seed", [0, 1, 2, HELDOUT_SEED0 + 1])
def test_ctr(seed):
    p = sample_patient(seed)
    normal = render(p, replace(NONE, cardiomegaly=False))
    big = render(p, replace(NONE, cardiomegaly=True, cardiomegaly_ctr=0.56))
    assert 0.36 < measure_ctr(normal.anatomy["heart"], normal.anatomy["thorax"]) < 0.5
    assert 0.5 < big.ctr < 0.68
    assert big.anatomy["heart"].sum() > normal.anatomy["heart"].sum()


@pytest.mark.parametrize("seed", [0, 4, HELDOUT_SEED0 + 2])
def test_right_effusion_raises_lower_lateral_right_zone(seed):
    p = sample_patient(seed)
    clear = render(p, NONE)
    eff = render(p, replace(NONE, effusion="right", effusion_size=0.5))
    lungs = clear.anatomy["lungs"]
    rows, cols = np.nonzero(lungs)
    # the patient's right is the image's left: lower third of the left-half lung, lateral half
    left = cols < 64
    r0, r1 = np.percentile(rows[left], [66, 100])
    c0, c1 = cols[left].min(), np.median(cols[left])
    zone = np.zeros_like(lungs)
    zone[int(r0):int(r1) + 1, int(c0):int(c1) + 1] = True
    zone &= lungs
    rise = eff.image[zone].mean() - clear.image[zone].mean()
    assert rise > 0.04
    # the other lung does not change
    np.testing.assert_array_equal(eff.image[:, 70:], clear.image[:, 70:])


def test_labels_and_captions():
    seen = set()
    for seed in range(40):
        p, at = _pair(seed)
        ph = render(p, at)
        assert ph.caption == chexpert_caption(ph.labels)
        assert ph.labels["Support Devices"] == int(at.devices)
        assert ph.labels["Pleural Effusion"] == int(at.effusion is not None)
        assert ph.labels["Cardiomegaly"] == int(at.cardiomegaly)
        assert ph.labels["No Finding"] == int(at.effusion is None and not at.cardiomegaly)
        seen.add(ph.caption)
    assert "Chest X-ray showing No Finding, Support Devices" in seen
    assert "Chest X-ray showing No Finding" in seen
    assert render(sample_patient(0), replace(NONE, devices=True, effusion="left", cardiomegaly=True)).caption == \
        "Chest X-ray showing Cardiomegaly, Pleural Effusion, Support Devices"


def test_counterfactuals_toggle_one_attribute():
    p, at = _pair(8)
    cfs = counterfactuals(p, replace(at, devices=True, effusion=None, cardiomegaly=False))
    assert set(cfs) == set(ATTRIBUTES)
    assert cfs["devices"].labels["Support Devices"] == 0
    assert cfs["effusion"].attributes.effusion == p.effusion_side
    assert cfs["cardiomegaly"].labels["Cardiomegaly"] == 1 and cfs["cardiomegaly"].labels["No Finding"] == 0
    assert cfs["effusion"].labels["Support Devices"] == 1


def test_prevalence():
    n = 400
    ats = [sample_attributes(s) for s in range(n)]
    for frac in (np.mean([a.devices for a in ats]), np.mean([a.effusion is not None for a in ats]),
                 np.mean([a.cardiomegaly for a in ats])):
        assert 0.35 < frac < 0.55


def test_write_phantom_set(tmp_path):
    from PIL import Image

    csv_path = write_phantom_set(tmp_path, [HELDOUT_SEED0, HELDOUT_SEED0 + 1], 64)
    meta = json.loads((tmp_path / "phantoms.json").read_text())["phantoms"]
    assert len(meta) == 2 and csv_path.exists()
    img = Image.open(tmp_path / meta[0]["file"])
    assert img.size == (64, 64) and img.mode.startswith("I")
    for attr in ATTRIBUTES:
        assert (tmp_path / meta[0][f"mask_{attr}"]).exists() and (tmp_path / meta[0][f"cf_{attr}"]).exists()
    assert meta[0]["caption"] == chexpert_caption({k: meta[0][k] for k in
                                                   ("No Finding", "Cardiomegaly", "Pleural Effusion", "Support Devices")})


@pytest.mark.slow
def test_train_phantom_end_to_end(tmp_path):
    """`prism-export train-phantom` at toy size: a diffusers folder the torch backend loads, a
    classifier.onnx with the documented interface, training.json."""
    pytest.importorskip("torch")
    import onnx
    import onnxruntime as ort
    import torch

    from prism_export.cli import main
    import prism_rt

    torch.set_num_threads(1)
    out = tmp_path / "phantom-model"
    assert main(["train-phantom", "--out", str(out), "--threads", "1", "--n-train", "48", "--n-heldout", "8",
                 "--vae-steps", "2", "--unet-steps", "2", "--cls-steps", "2", "--n-examples", "1",
                 "--unet-channels", "32,32,32,32", "--vae-channels", "8,16,16,16", "--text-width", "32"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert {"render", "classifier", "vae", "unet", "save"} <= set(record["times_s"])
    assert record["vae"]["scaling_factor"] > 0 and "heldout_psnr_db" in record["vae"]
    assert set(record["classifier"]["heldout_accuracy"]) == {"Support Devices", "Pleural Effusion", "Cardiomegaly"}

    proto = onnx.load(str(out / "classifier.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["prism.labels"]) == ["Support Devices", "Pleural Effusion", "Cardiomegaly"]
    assert meta["prism.input"] == "gray [0,1] 128"
    sess = ort.InferenceSession(str(out / "classifier.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert sess.run(["logits"], {"image": np.zeros((3, 1, 128, 128), np.float32)})[0].shape == (3, 3)

    engine = prism_rt.Engine.load(out, backend="torch")
    assert engine is not None
    assert (out / "examples" / "phantoms.csv").exists()
    assert main(["train-phantom", "--out", str(out)]) == 2  # refuses a non-empty folder

    # the pixel-grounding fine-tune: UNet and text encoder start from the trained ones (one step with
    # lr ≈ 0 keeps them), VAE and classifier are reused
    tuned = tmp_path / "tuned"
    assert main(["train-phantom", "--out", str(tuned), "--unet-from", str(out)]) == 2 and not tuned.exists()
    assert main(["train-phantom", "--out", str(tuned), "--threads", "1", "--n-train", "48", "--n-heldout", "8",
                 "--unet-steps", "1", "--n-examples", "0", "--vae-from", str(out), "--unet-from", str(out),
                 "--attention-loss", "0.1", "--attention-pixel-loss", "1.0", "--unet-lr", "1e-12"]) == 0
    tuned_record = json.loads((tuned / "training.json").read_text())
    assert tuned_record["unet_from"] == str(out) and tuned_record["config"]["attention_pixel_loss"] == 1.0
    from safetensors.numpy import load_file

    for part in ("unet", "text_encoder"):
        before, after = (load_file(next((m / part).glob("*.safetensors"))) for m in (out, tuned))
        assert before.keys() == after.keys()
        assert max(float(np.abs(before[k] - after[k]).max()) for k in before) < 1e-6
