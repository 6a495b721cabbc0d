"""The bundled demo engine (engines/phantom-demo, a model trained on phantoms): its size, and that
`prism-rt demo` really removes the support devices of a held-out patient, against the patient's
true counterfactual."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DEMO = Path(__file__).resolve().parent.parent / "engines" / "phantom-demo"
pytestmark = pytest.mark.skipif(not (DEMO / "demo.json").is_file(),
                                reason="engines/phantom-demo is not in this checkout (scripts/build_demo.sh builds it)")


def _gray(path: Path) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(path)).astype(np.float64)
    return image / (65535.0 if image.max() > 255 else 255.0)


def test_bundle_is_small_and_complete():
    from prism_rt.manifest import load_manifest

    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 42 * 2**20, f"the bundled demo is {size / 2**20:.1f} MiB"  # 40.4 MiB (2026-12-07, the pixel-grounded phantom)
    manifest = load_manifest(DEMO)  # every hash checked
    for precision in manifest.precisions[1:]:
        load_manifest(DEMO, precision=precision)
    spec = json.loads((DEMO / "demo.json").read_text())
    for key in ("image", "truth", "mask", "classifier"):
        assert (DEMO / spec[key]).is_file()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from prism_rt.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--out", str(out), "--no-progress", "--extras"]) == 0  # the reconstruction too
    return out


def test_demo_removes_the_devices(demo_run):
    spec = json.loads((DEMO / "demo.json").read_text())
    result = json.loads((demo_run / "result.json").read_text())
    choice = result["selection"][0]
    assert choice["attribute"] == "Support Devices" and choice["direction"] == "remove"
    assert choice["flipped"], choice  # the classifier no longer sees devices
    assert (demo_run / "figure.png").is_file() and (demo_run / "selected-0.png").is_file()
    source, truth = _gray(DEMO / spec["image"]), _gray(DEMO / spec["truth"])
    mask = _gray(DEMO / spec["mask"]) > 0.5
    edited, recon = _gray(demo_run / "selected-0.png"), _gray(demo_run / "reconstruction.png")
    # inside the devices' mask the counterfactual moved towards the patient without devices
    before = np.abs(source - truth)[mask].mean()
    after = np.abs(edited - truth)[mask].mean()
    assert after < 0.6 * before, (before, after)
    # outside it, the anatomy stays: PSNR against the reconstruction ≥ 30 dB (measured 35.3 dB on this
    # patient with the demo's attention LocalBlend and source negative, the filter choosing self window
    # 0.4; inside the mask 87 % of the way to the true counterfactual)
    mse = np.mean((edited - recon)[~mask] ** 2)
    assert 10 * np.log10(1 / mse) >= 30.0
    # and far closer to the reconstruction outside the mask than inside it
    assert np.abs(edited - recon)[~mask].mean() < 0.5 * np.abs(edited - recon)[mask].mean()


def test_evaluate_scores_composite_from_the_same_edit(monkeypatch):
    """`prism-rt evaluate`'s `+composite` configuration reuses its base configuration's edit (one
    `edit_many` per inversion method) and only adds candidates: with the plain counterfactual as its
    one threshold it is the base row exactly; with 0 and 0.08 the filter's pick is at least as close
    to the reconstruction over the whole image."""
    from prism_rt.engine import Engine
    from prism_rt.evaluate import Classifier
    from prism_bench.evaluate_cli import evaluate, phantom_cases

    engine = Engine.load(DEMO, backend="onnxruntime", threads=1)
    classifier = Classifier.load(DEMO / "classifier.onnx")
    cases = phantom_cases(1, ["devices-remove"], engine.backend.info.image_size, seed0=1_000_003)
    calls = []
    real = engine.edit_many
    monkeypatch.setattr(engine, "edit_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    configs = ["direct+noise-blend", "direct+noise-blend+composite"]
    plain, same = evaluate(engine, classifier, cases, configs, steps=10, sweep=(0.6,), progress=None, composite=(0.0,))
    assert len(calls) == 1
    drop = ("config", "composite", "seconds")
    assert {k: v for k, v in plain.items() if k not in drop} == {k: v for k, v in same.items() if k not in drop}
    assert same["composite"] == 0.0 and plain["composite"] is None
    plain, composited = evaluate(engine, classifier, cases, configs, steps=10, sweep=(0.6,), progress=None,
                                 composite=(0.0, 0.08))
    assert plain["success"], plain  # the demo patient: the devices go at 10 steps too
    assert composited["success"] and composited["identity"]["ssim"] >= plain["identity"]["ssim"]
    assert composited["identity_outside_mask"]["l1"] < plain["identity_outside_mask"]["l1"]


def test_evaluate_passes_the_blend_settings_and_scores_the_blend_mask():
    """`prism-rt evaluate --guidance --blend-threshold --blend-dilation`: the +blend configuration's
    mask is the one those settings give (no dilation: a subset of the published 3×3 pool's mask),
    and every row scores it against the attribute's mask; configurations without a mask have none."""
    from prism_rt.engine import Engine
    from prism_rt.evaluate import Classifier
    from prism_bench.evaluate_cli import evaluate, phantom_cases, summarize

    engine = Engine.load(DEMO, backend="onnxruntime", threads=1)
    classifier = Classifier.load(DEMO / "classifier.onnx")
    cases = phantom_cases(1, ["devices-remove"], engine.backend.info.image_size, seed0=1_000_003)
    rows = {}
    for dilation in (0, 1):
        rows[dilation] = evaluate(engine, classifier, cases, ["direct", "direct+blend"], steps=10, sweep=(0.6,),
                                  progress=None, guidance=3.0, blend={"blend_threshold": 0.3, "blend_dilation": dilation})
    plain, tight = rows[0]
    wide = rows[1][1]
    assert plain["blend_mask"] is None and summarize([plain])[0]["mask_iou_latent"] is None
    assert 0 < tight["blend_mask"]["cover"] < wide["blend_mask"]["cover"] < 1
    assert tight["blend_mask"]["recall"] <= wide["blend_mask"]["recall"]
    assert rows[0][0] == {**rows[1][0], "seconds": rows[0][0]["seconds"]}  # "direct" ignores the blend settings
