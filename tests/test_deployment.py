"""TensorRT execution-provider settings, computed without a GPU (pure functions of the manifest):
optimisation profiles from the recorded deployment, fp16 with int8, and an engine cache keyed on
the graph and its weights. Fast: the bundled engine's manifest, no export."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from prism_rt.deployment import Deployment
from prism_rt.errors import SettingsError
from prism_rt.manifest import load_manifest

DEMO = Path(__file__).resolve().parent.parent / "engines" / "phantom-demo"


def _profile(text: str) -> dict[str, list[int]]:
    """onnxruntime's TensorRT profile string ``name:AxBxC,name2:…`` read back."""
    return {name: [int(d) for d in dims.split("x")] for name, dims in (item.split(":") for item in text.split(","))}


def _shapes(options: dict) -> dict[str, dict[str, list[int]]]:
    return {level: _profile(options[f"trt_profile_{level}_shapes"]) for level in ("min", "opt", "max")}


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(DEMO, verify_hashes=False)


def test_default_profiles_are_the_deployed_calls_not_the_exported_range(manifest):
    """Defaults: inversion (N = 1, K = 0) to the edit call of one image with one edit × five self
    values, every item with its unconditional half: N = 2·(1 + 5) = 12 — not the exported 63."""
    from prism_rt.ort_backend import tensorrt_options

    m = manifest.raw["model"]
    side, t, width = m["latent_size"], m["max_tokens"], m["text_width"]
    unet = _shapes(tensorrt_options(manifest, "unet", 0, None))
    assert manifest.graphs["unet"].dims["batch"].max == 63  # what the graph takes …
    assert unet["min"]["latents"] == [1, 4, side, side] and unet["min"]["cross_alpha"] == [1, 0, t]
    for level in ("opt", "max"):  # … and what TensorRT is asked to reserve for
        assert unet[level]["latents"] == [12, 4, side, side] and unet[level]["text"] == [12, t, width]
        assert unet[level]["token_mapper"] == [1, 5, t, t] and unet[level]["self_replace"] == [1, 5]
    text = _shapes(tensorrt_options(manifest, "text_encoder", 0, None))
    assert (text["min"]["input_ids"], text["opt"]["input_ids"], text["max"]["input_ids"]) == ([1, t], [3, t], [7, t])
    for graph, name in (("vae_encoder", "pixels"), ("vae_decoder", "latents")):
        shapes = _shapes(tensorrt_options(manifest, graph, 0, None))
        assert {shapes[level][name][0] for level in shapes} == {1}, graph  # one image per call
        assert shapes["max"][name][2] == (8 * side if graph == "vae_encoder" else side)


def test_the_recorded_deployment_and_a_load_override_set_the_profiles(manifest):
    from prism_rt.ort_backend import deployment_of, dim_limits, tensorrt_options

    recorded = dataclasses.replace(manifest, raw={**manifest.raw, "deployment": Deployment(3, 2).to_json()})
    assert deployment_of(recorded) == Deployment(max_edits=3, max_groups=2)
    unet = _shapes(tensorrt_options(recorded, "unet", 0, None))
    assert unet["max"]["latents"][0] == 2 * 2 * (1 + 3) and unet["max"]["cross_alpha"][:2] == [2, 3]
    assert _shapes(tensorrt_options(recorded, "text_encoder", 0, None))["max"]["input_ids"][0] == 2 + 3
    override = Deployment(max_edits=10, max_batch=20)  # two edits × five values, chunked at N = 20
    unet = _shapes(tensorrt_options(recorded, "unet", 0, None, override))
    assert unet["max"]["latents"][0] == 20 and unet["max"]["cross_alpha"][:2] == [1, 10]
    assert dim_limits(recorded, override)["unet"] == {"batch": 20, "groups": 1, "edits": 10}
    assert dim_limits(recorded, None)["unet"] == {"batch": 63, "groups": 8, "edits": 62}  # CPU / CUDA: the export's


def test_a_deployment_beyond_the_export_or_below_one_call_is_refused(manifest):
    with pytest.raises(SettingsError, match=r"unet batch up to 72 .* at most 63; lower .* or re-export"):
        Deployment(max_edits=5, max_groups=6).profile(manifest.graphs["unet"])
    with pytest.raises(SettingsError, match="max_edits and max_groups must be ≥ 1"):
        Deployment(max_edits=0)
    with pytest.raises(SettingsError, match="at least 3"):
        Deployment(max_batch=2)
    assert Deployment.from_json(None) == Deployment() and Deployment.from_json(Deployment(2, 1, 8).to_json()) == \
        Deployment(2, 1, 8)


def test_an_int8_graph_builds_with_fp16_too(manifest):
    """Outside its Q/DQ pairs an int8 network runs at the precision the other flags allow: fp32
    without fp16. The flags follow each graph's precision."""
    from prism_rt.ort_backend import tensorrt_options

    for precision, fp16, int8 in (("fp32", False, False), ("fp16", True, False), ("int8", True, True)):
        graphs = {**manifest.graphs, "unet": dataclasses.replace(manifest.graphs["unet"], precision=precision)}
        options = tensorrt_options(dataclasses.replace(manifest, graphs=graphs), "unet", 0, None)
        assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == (fp16, int8), precision
        assert options["trt_context_memory_sharing_enable"] is True


def test_same_graph_file_with_other_weights_gets_another_cache_folder(tmp_path):
    """A re-export with new weights keeps unet.onnx byte for byte: the cache key must read the
    weights' hash too, or TensorRT would load the engine built from the old weights."""
    import prism_rt.ort_backend as ob

    other = tmp_path / "other"
    shutil.copytree(DEMO, other, ignore=shutil.ignore_patterns("images", "trt-cache"))
    data = other / "onnx" / "unet.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 0x01  # one bit of the last weight
    data.write_bytes(bytes(blob))
    raw = json.loads((other / "manifest.json").read_text())
    raw["graphs"]["unet"]["data_sha256"] = hashlib.sha256(bytes(blob)).hexdigest()
    (other / "manifest.json").write_text(json.dumps(raw))

    first, second = load_manifest(DEMO), load_manifest(other)  # hashes checked: the record is true
    assert first.graphs["unet"].sha256 == second.graphs["unet"].sha256  # the same graph file
    root = tmp_path / "cache"
    key = dict(ort_version="1.0", trt_version="10.0")
    assert ob.trt_cache_folder(first, "unet", 0, root, **key) != ob.trt_cache_folder(second, "unet", 0, root, **key)
    assert ob.trt_cache_folder(first, "vae_decoder", 0, root, **key) == \
        ob.trt_cache_folder(second, "vae_decoder", 0, root, **key)  # unchanged graph and weights: shared
    assert ob.trt_cache_folder(first, "unet", 0, root, **key) != \
        ob.trt_cache_folder(first, "unet", 0, root, deployment=Deployment(max_edits=2), **key)  # other profiles


def test_trt_deployment_flags_override_the_manifest(tmp_path):
    from prism_rt.cli_args import deployment_from_args

    args = argparse.Namespace(model=DEMO, trt_max_edits=None, trt_max_groups=None)
    assert deployment_from_args(args) is None  # nothing given: the manifest's, read by the backend
    args.trt_max_edits = 10
    assert deployment_from_args(args) == Deployment(max_edits=10, max_groups=1)
    args.trt_max_groups, args.model = 2, tmp_path  # no manifest here: the defaults under the flags
    assert deployment_from_args(args) == Deployment(max_edits=10, max_groups=2)


def test_export_skips_only_onnxscripts_slow_rewrite_rule():
    """SlicesSplit is dropped from onnxscript's default rewrite rules during an export (80 % of the
    UNet's export time, no rewrite on these graphs; the graphs come out byte-identical), the other
    rules stay, and the defaults come back afterwards."""
    from onnxscript import rewriter

    from prism_export.onnx_export import _without_slow_rules

    before = rewriter._DEFAULT_REWRITE_RULES
    names = [r.name for r in before]
    assert "SlicesSplit" in names
    with _without_slow_rules():
        inside = [r.name for r in rewriter._DEFAULT_REWRITE_RULES]
    assert inside == [n for n in names if n != "SlicesSplit"]
    assert rewriter._DEFAULT_REWRITE_RULES is before
