"""PRISM's CheXpert captions, against hand-written strings."""
import math

import pytest

from prism_rt.captions import CHEXPERT_LABELS, chexpert_caption
from prism_rt.errors import PromptError


def test_labels_in_chexpert_order():
    assert CHEXPERT_LABELS == (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
        "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
        "Pleural Other", "Fracture", "Support Devices",
    )


def test_mapping_row():
    row = {
        "Path": "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg", "Sex": "Female",
        "Support Devices": 1.0, "Pleural Effusion": 1, "Cardiomegaly": -1.0, "Edema": 0.0,
        "Lung Opacity": math.nan, "Fracture": None, "No Finding": "",
    }
    assert chexpert_caption(row) == "Chest X-ray showing Pleural Effusion, Support Devices"


def test_only_uncertain_is_normal():
    assert chexpert_caption({"Cardiomegaly": -1, "Edema": 0, "Fracture": float("nan")}) == \
        "Normal chest X-ray with no significant findings"
    assert chexpert_caption({}) == "Normal chest X-ray with no significant findings"
    assert chexpert_caption([]) == "Normal chest X-ray with no significant findings"


def test_iterable_of_names_in_chexpert_order():
    assert chexpert_caption(["Support Devices", "Cardiomegaly", "Lung Opacity"]) == \
        "Chest X-ray showing Cardiomegaly, Lung Opacity, Support Devices"
    assert chexpert_caption({"Support Devices"}) == "Chest X-ray showing Support Devices"
    assert chexpert_caption("No Finding") == "Chest X-ray showing No Finding"


def test_unknown_names():
    with pytest.raises(PromptError, match=r"'Pleural effusion'.*valid labels are: No Finding, .*Support Devices"):
        chexpert_caption(["Pleural effusion"])
    with pytest.raises(PromptError, match="none of the keys"):
        chexpert_caption({"Effusion": 1})
    with pytest.raises(PromptError, match="1, 0, -1"):
        chexpert_caption({"Edema": "yes"})
