"""Judging counterfactuals: the ONNX classifier wrapper, CPG and flips, identity outside the mask,
PRISM's selection over the sweep, and `prism-rt edit --select` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from prism_rt.errors import PromptError, SettingsError
from prism_rt.evaluate import Classifier, ClassifierError, edit_direction, edit_metrics, select

LABELS = ["Support Devices", "Pleural Effusion"]


def write_classifier(path, weights=(8.0, -8.0), bias=(-4.0, 4.0), size=16, labels=LABELS, meta=True):
    """logits_j = w_j · mean(image) + b_j: a classifier whose probabilities are known in closed form."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "one"], ["m1"]),
             helper.make_node("Mul", ["m1", "w"], ["wx"]), helper.make_node("Add", ["wx", "b"], ["logits"])]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])],
        [numpy_helper.from_array(np.array(weights, np.float32)[None], "w"),
         numpy_helper.from_array(np.array(bias, np.float32)[None], "b"),
         numpy_helper.from_array(np.array([1], np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    if meta:
        model.metadata_props.add(key="prism.labels", value=json.dumps(list(labels)))
    onnx.save(model, str(path))
    return path


def test_classifier_probabilities_match_the_closed_form(tmp_path):
    clf = Classifier.load(write_classifier(tmp_path / "c.onnx"))
    assert clf.labels == tuple(LABELS) and clf.size == (16, 16)
    images = [np.full((32, 32), 0.25, np.float32), np.full((16, 16), 0.75, np.float32)]  # any size: resized
    p = clf.probabilities(images)
    expected = 1 / (1 + np.exp(-(np.array([[8.0, -8.0]]) * np.array([[0.25], [0.75]]) + np.array([[-4.0, 4.0]]))))
    np.testing.assert_allclose(p, expected, rtol=1e-5)


def test_classifier_without_labels_or_missing_is_refused(tmp_path):
    with pytest.raises(ClassifierError, match="prism.labels"):
        Classifier.load(write_classifier(tmp_path / "c.onnx", meta=False))
    assert Classifier.load(tmp_path / "c.onnx", labels=("A", "B")).labels == ("A", "B")
    with pytest.raises(ClassifierError, match="does not exist"):
        Classifier.load(tmp_path / "missing.onnx")


def test_edit_direction_reads_the_captions():
    assert edit_direction("Chest X-ray showing No Finding, Support Devices", "Chest X-ray showing No Finding",
                          LABELS) == ("Support Devices", "remove")
    assert edit_direction("Chest X-ray showing No Finding", "Chest X-ray showing Pleural Effusion",
                          LABELS) == ("Pleural Effusion", "add")
    with pytest.raises(PromptError, match="cannot tell"):
        edit_direction("Chest X-ray showing Support Devices", "Chest X-ray showing Pleural Effusion", LABELS)


def test_edit_metrics_by_hand(tmp_path):
    clf = Classifier.load(write_classifier(tmp_path / "c.onnx"))
    recon = np.full((16, 16), 0.8, np.float32)  # p(devices) = σ(8·0.8 − 4) = σ(2.4) > 0.5
    cf = recon.copy()
    mask = np.zeros((16, 16), bool)
    mask[:8] = True
    cf[mask] = 0.2  # inside the mask only: mean 0.5 → σ(0) = 0.5 → not < 0.5, so no flip
    cf_out = cf.copy()
    cf_out[~mask] -= 0.1  # now also 0.1 darker outside the mask: mean 0.45 → flips
    row = edit_metrics(clf, "Support Devices", "remove", recon, recon, cf, mask, truth01=cf)
    assert row["classifier"]["p_source"] == pytest.approx(1 / (1 + np.exp(-2.4)), rel=1e-5)
    assert not row["classifier"]["flipped"]
    assert row["identity_outside_mask"]["l1"] == 0.0 and row["identity_outside_mask"]["psnr_db"] == 99.0
    assert row["truth"] == {"l1_inside": 0.0, "l1_outside": 0.0, "left": 0.0, "success": True, "change_iou": 1.0}
    row = edit_metrics(clf, "Support Devices", "remove", recon, recon, cf_out, mask)
    assert row["classifier"]["flipped"] and row["classifier"]["cpg"] > 0
    assert row["identity_outside_mask"]["l1"] == pytest.approx(0.1, abs=1e-6)
    assert row["identity_outside_mask"]["psnr_db"] == pytest.approx(20.0, abs=1e-3)  # 10·log10(1/0.01)
    # whole image: half the pixels 0.6 off (inside), half 0.1 off (outside)
    assert row["identity"]["l1"] == pytest.approx(0.35, abs=1e-6)
    assert row["identity"]["psnr_db"] == pytest.approx(10 * np.log10(1 / ((0.36 + 0.01) / 2)), abs=1e-3)
    with pytest.raises(SettingsError, match="no label"):
        edit_metrics(clf, "Cardiomegaly", "add", recon, recon, cf)


def test_select_prefers_a_flip_then_identity():
    def row(flipped, ssim, l1, cpg=0.1):
        return {"classifier": {"flipped": flipped, "cpg": cpg}, "identity": {"ssim": ssim, "l1": l1},
                "identity_outside_mask": {"ssim": 1.0 - ssim, "l1": 1.0 - l1}}  # not what it judges by

    assert select([row(False, 0.99, 0.0), row(True, 0.8, 0.1), row(True, 0.9, 0.2)])["selected"] == 2
    assert select([row(True, 0.9, 0.2), row(True, 0.9, 0.1)])["selected"] == 1  # SSIM tie: lower L1
    none = select([row(False, 0.9, 0.1, cpg=0.1), row(False, 0.8, 0.1, cpg=0.3)])
    assert none["selected"] is None and not none["flipped"] and none["best_cpg_index"] == 1


def test_cli_edit_select_writes_the_choice(tiny_model_dir, dicom_path, tmp_path, capsys):
    from prism_rt.cli import main

    # a classifier that sees devices everywhere: no value can flip it, which the output must say
    clf = write_classifier(tmp_path / "c.onnx", weights=(0.0, 0.0), bias=(1.0, 1.0))
    out = tmp_path / "out"
    code = main(["edit", "--model", str(tiny_model_dir), "--inversion", "direct", "--steps", "4", "--image",
                 str(dicom_path), "--prompt", "Chest X-ray showing Support Devices", "--target",
                 "Chest X-ray showing No Finding", "--self-replace", "0.4,0.8", "--select", str(clf), "--figure",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    choice = result["selection"][0]
    assert choice["attribute"] == "Support Devices" and choice["direction"] == "remove"
    assert not choice["flipped"] and choice["selected_item"] is None and "no candidate" in choice["note"]
    assert [c["self_replace"] for c in choice["candidates"]] == [0.4, 0.8]
    assert all(c["classifier"]["p_source"] == pytest.approx(1 / (1 + np.exp(-1))) for c in choice["candidates"])
    assert not (out / "selected-0.png").exists() and (out / "figure.png").is_file()
    assert "no candidate flips" in capsys.readouterr().out


def test_cli_edit_select_with_an_unrelated_edit_fails_before_work(tiny_model_dir, dicom_path, tmp_path, capsys):
    from prism_rt.cli import main

    clf = write_classifier(tmp_path / "c.onnx")
    code = main(["edit", "--model", str(tiny_model_dir), "--image", str(dicom_path), "--prompt",
                 "Chest X-ray showing Cardiomegaly", "--target", "Chest X-ray showing No Finding",
                 "--select", str(clf), "--out", str(tmp_path / "out")])
    assert code == 2 and "cannot tell" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ground_truth_check_by_hand():
    """A device of 16 pixels in a 16×16 image; the true counterfactual removes it."""
    from prism_rt.evaluate import ground_truth_check

    source = np.full((16, 16), 0.3, np.float32)
    source[4:8, 4:8] = 0.9  # the device
    truth = np.full((16, 16), 0.3, np.float32)
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    assert ground_truth_check(source, source, truth, truth, mask) == {"left": 0.0, "success": True, "change_iou": 1.0}
    assert ground_truth_check(source, source, source, truth, mask) == {"left": 1.0, "success": False, "change_iou": 0.0}
    half = truth.copy()
    half[4:6, 4:8] = 0.85  # the top half of the device kept (closer to the source), the rest removed
    half[0, :4] = 0.0  # and four pixels outside the device changed
    check = ground_truth_check(source, source, half, truth, mask)
    assert check["left"] == 0.5 and check["success"] is False
    assert check["change_iou"] == pytest.approx(8 / (16 + 4))  # changed: 8 inside + 4 outside; union 20
    assert ground_truth_check(source, source, source, source, None) == {"left": None, "success": None,
                                                                         "change_iou": None}


def test_blend_mask_overlap_by_hand():
    """A 16×16 image of 4-pixel latent cells; a 1-pixel-wide lead down column 5 (rows 0–7) lies in
    cells (0,1) and (1,1)."""
    from prism_rt.evaluate import blend_mask_overlap

    lead = np.zeros((16, 16), bool)
    lead[0:8, 5] = True
    exact = np.zeros((16, 16), np.float32)
    exact[0:8, 4:8] = 1.0  # exactly the lead's two cells
    got = blend_mask_overlap(exact, lead, 4)
    assert got == {"iou_latent": 1.0, "iou": pytest.approx(8 / 32), "recall": 1.0, "cover": 32 / 256}
    wide = np.zeros((16, 16), np.float32)
    wide[0:12, 4:12] = 1.0  # six cells, two of them the lead's
    got = blend_mask_overlap(wide, lead, 4)
    assert got["iou_latent"] == pytest.approx(2 / 6) and got["recall"] == 1.0 and got["cover"] == 96 / 256
    half = np.zeros((16, 16), np.float32)
    half[0:4, 4:8] = 1.0  # one of the two cells: half the lead
    got = blend_mask_overlap(half, lead, 4)
    assert got["iou_latent"] == 0.5 and got["recall"] == 0.5
    assert blend_mask_overlap(np.zeros((16, 16)), np.zeros((16, 16), bool), 4)["iou_latent"] is None
    with pytest.raises(ValueError, match="latent cells"):
        blend_mask_overlap(exact, lead, 5)
