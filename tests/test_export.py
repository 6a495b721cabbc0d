"""The export stage and the onnxruntime backend: checkpoint → engine folder → the same images.

One export of the tiny SD-v1.5-layout model (module fixture, ~1.5 min on 2 cores) serves every
test. References are the torch graph modules built from the same checkpoint: the modules the
torch backend runs and the export traced.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from prism_rt.backend import GRAPHS
from prism_rt.config import ControlConfig, RunLimits
from prism_rt.engine import Engine
from prism_rt.errors import BackendError
from prism_rt.manifest import FORMAT_VERSION, EngineMismatchError, load_manifest, sha256_file

SOURCE = "Chest X-ray showing Support Devices"
TARGET = "Chest X-ray showing No Finding"
from test_torch_free import BLOCK_TORCH  # noqa: E402
ONE_LEVEL = 1 / 255  # on the [0, 1] image scale
# Below the tiny model's 16×16 = 256 self-attention queries: the exported UNet then holds both
# paths of the controlled attention, fused SDPA (16×16 layers) and explicit, controlled softmax.
SELF_MAX_QUERIES = 128


@pytest.fixture(scope="module")
def export_run(tiny_model_dir, tmp_path_factory):
    from prism_export.onnx_export import export_engine

    lines: list[str] = []
    out = export_engine(tiny_model_dir, tmp_path_factory.mktemp("engines") / "tiny-engine",
                        self_max_queries=SELF_MAX_QUERIES, progress=lines.append)
    return out, lines


@pytest.fixture(scope="module")
def engine_dir(export_run) -> Path:
    return export_run[0]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The torch graph modules and the graph specs, from the same checkpoint."""
    from prism_export.specs import ModelDims, graph_specs
    from prism_rt.torch_backend.checkpoint import load_checkpoint
    from prism_rt.torch_backend.graphs import build_graphs

    components = load_checkpoint(tiny_model_dir)
    graphs = build_graphs(components, SELF_MAX_QUERIES)
    return components, graphs, graph_specs(ModelDims.from_components(components, graphs["unet"]), SELF_MAX_QUERIES)


@pytest.fixture(scope="module")
def engines(engine_dir, tiny_model_dir):
    return {kind: Engine.load(path, backend=kind, self_max_queries=SELF_MAX_QUERIES)
            for kind, path in (("onnxruntime", engine_dir), ("torch", tiny_model_dir))}


@pytest.fixture(scope="module")
def image(dicom_path):
    from prism_rt.imageio import load_image

    return load_image(dicom_path)


def _copy_engine(engine_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(engine_dir, tmp_path / "engine"))


# -- the export ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_writes_one_progress_line_per_graph_and_a_complete_folder(export_run):
    engine_dir, lines = export_run
    assert [line.split(":")[0] for line in lines] == list(GRAPHS)
    assert all("parity" in line for line in lines)
    # each graph, its weights, and the CPU twins of those with attention (the text encoder's is causal-masked)
    assert sorted(p.name for p in (engine_dir / "onnx").iterdir()) == sorted(
        [f"{g}.onnx{suffix}" for g in GRAPHS for suffix in ("", ".data")]
        + [f"{g}.cpu.onnx" for g in ("unet", "vae_encoder", "vae_decoder")])
    assert all("CPU twin" in line for line in lines if not line.startswith("text_encoder"))
    assert (engine_dir / "manifest.json").is_file() and any((engine_dir / "tokenizer").iterdir())
    assert not list(engine_dir.parent.glob(".*partial*")), "the staging folder was left behind"


@pytest.mark.slow
@pytest.mark.parametrize("graph", GRAPHS)
def test_onnx_graph_matches_torch_at_several_batch_sizes(engine_dir, reference, graph):
    import onnxruntime as ort
    import torch

    _, modules, specs = reference
    spec = specs[graph]
    session = ort.InferenceSession(str(engine_dir / "onnx" / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
    cases = {
        "text_encoder": [{"batch": 1}, {"batch": 4}, {"batch": 7}],
        "vae_encoder": [{"batch": 1}, {"batch": 3}],
        "vae_decoder": [{"batch": 1}, {"batch": 3}],
        "unet": [{"uncond": 0, "groups": 1, "edits": 0}, {"uncond": 0, "groups": 1, "edits": 1},
                 {"uncond": 3, "groups": 1, "edits": 3}, {"uncond": 1, "groups": 2, "edits": 2},
                 {"uncond": 6, "groups": 1, "edits": 6}],
    }[graph]
    for i, case in enumerate(cases):
        inputs = spec.sample_inputs(np.random.default_rng(100 + i), **case)
        with torch.no_grad():
            ref = modules[graph](**{k: torch.from_numpy(v) for k, v in inputs.items()})
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        got = session.run(spec.output_names, inputs)
        for name, g, r in zip(spec.output_names, got, ref):
            assert g.shape == r.shape, (graph, name, case)
            rel = np.abs(g - r).max() / np.abs(r).max()
            assert rel <= 1e-4, f"{graph}.{name} at {case}: relative error {rel:.2e}"


@pytest.mark.slow
def test_manifest_records_what_the_runtime_and_the_builder_need(engine_dir, reference, tiny_model_dir):
    components, modules, specs = reference
    raw = json.loads((engine_dir / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION and raw["opset"] == 18
    assert {"torch", "onnx", "onnxscript"} <= set(raw["exporter"])
    assert raw["source"]["weights"] == components.provenance["weights"]
    assert raw["model"]["scheduler_config"] == json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert raw["model"]["scaling_factor"] == pytest.approx(components.scaling_factor)
    assert (raw["model"]["image_size"], raw["model"]["latent_channels"], raw["model"]["text_width"],
            raw["model"]["max_tokens"]) == (128, 4, 32, 77)
    unet = modules["unet"]
    control = raw["control"]
    assert [layer["name"] for layer in control["layers"]] == [layer.name for layer in unet.layers]
    assert control["blend_layers"] == unet.blend_layers and control["blend_downsample"] == unet.blend_downsample
    assert control["self_max_queries"] == unet.self_max_queries == SELF_MAX_QUERIES
    self_layers = [layer for layer in control["layers"] if not layer["is_cross"]]
    assert {layer["name"] for layer in self_layers if layer["downsample"] > 1} == set(control["controlled_self_layers"])
    for name in GRAPHS:
        g = raw["graphs"][name]
        assert g["sha256"] == sha256_file(engine_dir / g["file"])
        assert g["data_sha256"] == sha256_file(engine_dir / g["data_file"])
        assert g["inputs"] == [t.to_json() for t in specs[name].inputs()]
        assert g["parity"]["max_rel"] <= 1e-4 and g["parity"]["max_abs"] >= 0 and len(g["parity"]["cases"]) >= 3
        assert g["precision"] == "fp32"
    unet_entry = raw["graphs"]["unet"]
    assert unet_entry["dims"]["batch"]["max"] == 63 and unet_entry["dims"]["edits"]["min"] == 0
    assert unet_entry["fixed_spatial"] and unet_entry["inputs"][0]["shape"] == ["batch", 4, 16, 16]
    assert unet_entry["profile"]["token_mapper"]["opt"] == [1, 5, 77, 77]
    assert raw["graphs"]["vae_decoder"]["inputs"][0]["shape"] == ["batch", 4, "latent_height", "latent_width"]
    # what TensorRT's profiles are built for, and each graph's activation memory (prism-rt info --memory)
    assert raw["deployment"] == {"max_edits": 5, "max_groups": 1, "max_batch": None, "unet_batch": 12}
    for name in GRAPHS:
        memory = raw["graphs"][name]["memory"]
        small, large = memory["activation_points"]
        assert memory["shape_coverage"] > 0.9 and 0 < small["bytes"] < large["bytes"], (name, memory)


@pytest.mark.slow
def test_each_graph_keeps_its_weights_in_one_data_file(engine_dir):
    import onnx
    from onnx.external_data_helper import uses_external_data

    for name in GRAPHS:
        model = onnx.load(str(engine_dir / "onnx" / f"{name}.onnx"), load_external_data=False)
        locations = {e.value for t in model.graph.initializer if uses_external_data(t)
                     for e in t.external_data if e.key == "location"}
        assert locations == {f"{name}.onnx.data"}, (name, locations)


@pytest.mark.slow
def test_every_op_of_every_graph_is_supported_by_tensorrt(engine_dir):
    import onnx

    from prism_export.trt_ops import OPSET_RANGE, SUPPORTED_OPS, graph_ops, unsupported_ops, unsupported_types

    assert len(SUPPORTED_OPS) > 100
    for name in GRAPHS:
        model = onnx.load(str(engine_dir / "onnx" / f"{name}.onnx"), load_external_data=False)
        assert graph_ops(model), name
        assert unsupported_ops(model) == [], name
        assert unsupported_types(model) == [], name  # each node's data type too
        opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        assert OPSET_RANGE[0] <= opsets["ai.onnx"] <= OPSET_RANGE[1]


@pytest.mark.slow
def test_cpu_twin_fuses_every_attention_product_exactly_and_leaves_blend_maps(engine_dir):
    """The export's CPU twin of the UNet (onnx/unet.cpu.onnx, the graph onnxruntime's CPU provider
    runs): every attention product becomes MultiHeadAttention — the uncontrolled layers (the 16×16
    self-attention here, as SELF_MAX_QUERIES is below 256) and both products of each controlled
    layer; only LocalBlend's explicit maps keep a Softmax. It reads the portable graph's weights
    file, and its outputs equal the portable graph's, with and without edit items."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import uses_external_data

    raw = json.loads((engine_dir / "manifest.json").read_text())
    twin = raw["graphs"]["unet"]["cpu"]
    assert twin["file"] == "onnx/unet.cpu.onnx" and twin["sha256"] == sha256_file(engine_dir / twin["file"])
    portable_path, twin_path = engine_dir / "onnx" / "unet.onnx", engine_dir / twin["file"]
    before = onnx.load(str(portable_path), load_external_data=False)
    after = onnx.load(str(twin_path), load_external_data=False)
    ops = lambda m, t: sum(n.op_type == t for n in m.graph.node)  # noqa: E731
    # 5 uncontrolled: two 16×16 transformer blocks in the first down block, three in the last up
    # block; 27 controlled layers (cross-attention everywhere, self-attention at 8×8) × 2 products
    assert twin["fused_attentions"] == 5 + 2 * 27 == ops(after, "MultiHeadAttention")
    assert twin["fused_gelu"] == 16 == ops(after, "Gelu")  # one per transformer block's feed-forward
    assert ops(before, "MultiHeadAttention") == 0 == ops(before, "Gelu")
    assert ops(after, "Softmax") == 5  # LocalBlend's maps: the cross-attention at the blend layers
    # the uncontrolled layers' attention reads q, k, v straight from their projections (the exporter's
    # relayout chains and √scale multiplications checked exact and folded) and writes the tensor
    # to_out reads: 4 per layer; the controlled layers' products at least in part
    from prism_export.cpu_attention import direct_io

    uncontrolled = [n for n in after.graph.node if n.op_type == "MultiHeadAttention"
                    and not any(i.startswith("prism_mha_") for i in (*n.input, *n.output))]
    assert len(uncontrolled) == 5 and {round(a.f, 6) for n in uncontrolled for a in n.attribute if a.name == "scale"} \
        != {1.0}
    assert twin["attention_direct_io"] == direct_io(after) > 5 * 4
    assert ops(after, "Transpose") < ops(before, "Transpose") + 2 * twin["fused_attentions"]
    assert {e.value for t in after.graph.initializer if uses_external_data(t) for e in t.external_data
            if e.key == "location"} == {"unet.onnx.data"}
    assert twin_path.stat().st_size < 2 * portable_path.stat().st_size  # no copy of the weights
    assert twin["parity"]["max_rel"] <= 1e-4  # against torch, at the export's parity shapes
    rng = np.random.default_rng(0)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (portable_path, twin_path)]
    for batch, groups, edits in ((1, 1, 0), (5, 1, 2), (6, 2, 1)):
        feeds = dict(latents=rng.standard_normal((batch, 4, 16, 16), dtype=np.float32),
                     timestep=np.array([401.0], np.float32), text=rng.standard_normal((batch, 77, 32), dtype=np.float32),
                     cross_alpha=np.full((groups, edits, 77), 0.5, np.float32),
                     token_mapper=np.broadcast_to(np.eye(77, dtype=np.float32), (groups, edits, 77, 77)).copy(),
                     refine_alpha=np.ones((groups, edits, 77), np.float32),
                     equalizer=np.ones((groups, edits, 77), np.float32),
                     self_replace=np.full((groups, edits), 0.5, np.float32))
        (noise_a, maps_a), (noise_b, maps_b) = (s.run(None, feeds) for s in sessions)
        np.testing.assert_allclose(noise_b, noise_a, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(maps_b, maps_a, atol=1e-6)


@pytest.mark.slow
def test_cpu_twin_runs_the_latent_prefix_once_per_distinct_latent(engine_dir):
    """The UNet twin computes what comes before text enters (conv_in, the first ResNet, the first
    transformer's self-attention) on the distinct latents only and gathers it back: a direct edit
    step's batch [edit, source, edit] runs it on 2 rows; outputs equal the portable graph's."""
    import onnx
    import onnxruntime as ort

    raw = json.loads((engine_dir / "manifest.json").read_text())
    prefix = raw["graphs"]["unet"]["cpu"]["latent_prefix"]
    assert prefix["nodes"] > 20 and prefix["ops"]["Conv"] >= 3 and "Unique" in raw["graphs"]["unet"]["cpu"]["ops"]
    twin = onnx.load(str(engine_dir / "onnx" / "unet.cpu.onnx"), load_external_data=False)
    assert [n.op_type for n in twin.graph.node].count("Unique") == 1
    twin.graph.output.append(onnx.helper.make_tensor_value_info("prism_dedupe/latents", onnx.TensorProto.FLOAT, None))
    (engine_dir / "onnx" / "unet.probe.onnx").write_bytes(twin.SerializeToString())  # reads the same weights file
    try:
        probe = ort.InferenceSession(str(engine_dir / "onnx" / "unet.probe.onnx"), providers=["CPUExecutionProvider"])
    finally:
        (engine_dir / "onnx" / "unet.probe.onnx").unlink()
    portable = ort.InferenceSession(str(engine_dir / "onnx" / "unet.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    source, edit = rng.standard_normal((2, 1, 4, 16, 16), dtype=np.float32)
    for latents, distinct in ((np.concatenate([edit, source, edit]), 2), (np.concatenate([source, source]), 1),
                              (rng.standard_normal((3, 4, 16, 16), dtype=np.float32), 3)):
        n, edits = len(latents), 1 if len(latents) == 3 else 0
        feeds = dict(latents=latents, timestep=np.array([401.0], np.float32),
                     text=rng.standard_normal((n, 77, 32), dtype=np.float32),
                     cross_alpha=np.full((1, edits, 77), 0.5, np.float32),
                     token_mapper=np.broadcast_to(np.eye(77, dtype=np.float32), (1, edits, 77, 77)).copy(),
                     refine_alpha=np.ones((1, edits, 77), np.float32), equalizer=np.ones((1, edits, 77), np.float32),
                     self_replace=np.full((1, edits), 0.5, np.float32))
        noise, maps, rows = probe.run(None, feeds)
        assert len(rows) == distinct
        want_noise, want_maps = portable.run(None, feeds)
        np.testing.assert_allclose(noise, want_noise, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(maps, want_maps, atol=1e-6)
        assert np.abs(noise[0] - noise[-1]).max() > 1e-3  # unconditional and conditional text differ after the prefix


def test_the_latent_prefix_ends_where_batch_rows_mix():
    """A reduction over the batch reads every row, repeated ones included: the prefix stops before
    it (a graph where it would otherwise follow the convolution), and the rewritten graph equals the
    original on a batch with repeats; over the channels it stays in the prefix."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from prism_export.cpu_dedupe import dedupe_prefix

    rng = np.random.default_rng(0)
    for axis, prefix_nodes in ((0, 1), (1, 3)):
        nodes = [helper.make_node("Conv", ["latents", "w"], ["y"], pads=[1, 1, 1, 1]),
                 helper.make_node("ReduceMean", ["y", "axes"], ["r"], keepdims=1),
                 helper.make_node("Add", ["y", "r"], ["z"]),
                 helper.make_node("Mul", ["z", "text"], ["noise"])]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["batch", 2, 4, 4]),
                         helper.make_tensor_value_info("text", TensorProto.FLOAT, ["batch", 1, 1, 1])],
            [helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", 3, 4, 4])],
            [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([axis], np.int64), "axes")])
        model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
        original = model.SerializeToString()
        assert dedupe_prefix(model)["nodes"] == prefix_nodes
        onnx.checker.check_model(model)
        x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
        feeds = {"latents": x[[0, 1, 0, 0]], "text": rng.standard_normal((4, 1, 1, 1)).astype(np.float32)}
        got, want = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                     for m in (model.SerializeToString(), original))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_graph_of_latents_alone_has_no_prefix_to_share(engine_dir):
    """The VAE decoder reads nothing but latents: nothing in it is shared by rows that differ
    elsewhere, so its twin gets no Unique (the UNet's does)."""
    import onnx

    raw = json.loads((engine_dir / "manifest.json").read_text())
    assert raw["graphs"]["unet"]["cpu"]["latent_prefix"]["nodes"] > 0
    assert raw["graphs"]["vae_decoder"]["cpu"]["latent_prefix"]["nodes"] == 0
    decoder = onnx.load(str(engine_dir / raw["graphs"]["vae_decoder"]["cpu"]["file"]), load_external_data=False)
    assert [i.name for i in decoder.graph.input] == ["latents"]
    assert "Unique" not in {n.op_type for n in decoder.graph.node}


@pytest.mark.slow
def test_the_cpu_provider_runs_the_cpu_twins_and_portable_graphs_on_request(engine_dir, image):
    """Which file each session loaded, and that both give the same inversion."""
    raw = json.loads((engine_dir / "manifest.json").read_text())
    twins = {name: g["cpu"]["file"] for name, g in raw["graphs"].items() if g.get("cpu")}
    assert "unet" in twins and "text_encoder" not in twins  # its causal-masked attention is not the fused pattern
    fused = Engine.load(engine_dir, backend="onnxruntime", self_max_queries=SELF_MAX_QUERIES)
    portable = Engine.load(engine_dir, backend="onnxruntime", self_max_queries=SELF_MAX_QUERIES, cpu_graphs=False)
    files = fused.backend.describe()["graph_files"]
    assert files == {name: twins.get(name, raw["graphs"][name]["file"]) for name in GRAPHS}
    assert portable.backend.describe()["graph_files"] == {name: raw["graphs"][name]["file"] for name in GRAPHS}
    a, b = (e.invert(image, SOURCE, method="direct", sampler=e.sampler(steps=5)) for e in (fused, portable))
    assert np.abs(a.trajectory[-1]).max() > 0.5
    np.testing.assert_allclose(a.trajectory, b.trajectory, atol=1e-4)


@pytest.mark.slow
def test_a_changed_or_missing_cpu_twin_is_refused(engine_dir, tmp_path):
    engine = _copy_engine(engine_dir, tmp_path)
    twin = engine / "onnx" / "unet.cpu.onnx"
    twin.write_bytes(twin.read_bytes()[:-10])
    with pytest.raises(EngineMismatchError, match=r"unet\.cpu\.onnx.*SHA-256.*prism-export export"):
        load_manifest(engine)
    twin.unlink()
    with pytest.raises(EngineMismatchError, match=r"unet\.cpu\.onnx.*missing"):
        load_manifest(engine)


@pytest.mark.slow
def test_cpu_graphs_adds_the_twins_to_an_older_engine(engine_dir, tmp_path):
    """`prism-export cpu-graphs` on a folder without twins (as exported before they existed) writes
    the same files the export writes, checked against the portable graphs; a failed check leaves
    the folder as it was."""
    from prism_export.cli import main as export_main
    from prism_export.onnx_export import ExportError, add_cpu_graphs

    engine = _copy_engine(engine_dir, tmp_path)
    path = engine / "manifest.json"
    exported = json.loads(path.read_text())
    older = json.loads(path.read_text())
    twins = {name: g.pop("cpu") for name, g in older["graphs"].items() if "cpu" in g}
    for twin in twins.values():
        (engine / twin["file"]).unlink()
    path.write_text(json.dumps(older))
    assert load_manifest(engine).graphs["unet"].cpu_file is None
    with pytest.raises(ExportError, match="differs from the portable graph"):
        add_cpu_graphs(engine, parity_tolerance=1e-12, progress=lambda line: None)
    assert json.loads(path.read_text()) == older and not any(engine.glob("onnx/*.cpu.onnx"))
    assert export_main(["cpu-graphs", "--engine", str(engine)]) == 0
    added = json.loads(path.read_text())
    for name, twin in twins.items():
        assert added["graphs"][name]["cpu"]["sha256"] == twin["sha256"], name  # the export's own file
        assert added["graphs"][name]["cpu"]["parity"]["max_rel"] <= 1e-4
    assert {k: v for k, v in added.items() if k != "graphs"} == {k: v for k, v in exported.items() if k != "graphs"}
    assert load_manifest(engine).graphs["unet"].cpu_file == engine / "onnx" / "unet.cpu.onnx"
    assert add_cpu_graphs(engine, progress=lambda line: None) == {}
    # --replace rewrites the twins an engine has (an engine whose twins came from an older fusion):
    # a failed check keeps the old ones and their manifest, no staged file stays behind
    older_twin = (engine / "onnx" / "unet.onnx").read_bytes()  # a valid twin with nothing fused
    (engine / "onnx" / "unet.cpu.onnx").write_bytes(older_twin)
    older_twins = json.loads(path.read_text())
    older_twins["graphs"]["unet"]["cpu"]["sha256"] = sha256_file(engine / "onnx" / "unet.cpu.onnx")
    path.write_text(json.dumps(older_twins))
    with pytest.raises(ExportError, match="differs from the portable graph"):
        add_cpu_graphs(engine, parity_tolerance=1e-12, progress=lambda line: None, replace=True)
    assert json.loads(path.read_text()) == older_twins and not any(engine.glob("onnx/*.next*"))
    assert (engine / "onnx" / "unet.cpu.onnx").read_bytes() == older_twin
    assert export_main(["cpu-graphs", "--engine", str(engine), "--replace"]) == 0
    assert json.loads(path.read_text()) == added and not any(engine.glob("onnx/*.next*"))
    assert load_manifest(engine).graphs["unet"].cpu_file == engine / "onnx" / "unet.cpu.onnx"


def test_a_failed_export_leaves_no_engine_folder(tiny_model_dir, tmp_path, monkeypatch):
    from prism_export import onnx_export

    def broken(module, spec, path, opset=18):
        path.write_bytes(b"half a graph")
        raise onnx_export.ExportError("simulated failure")

    monkeypatch.setattr(onnx_export, "export_graph", broken)
    out = tmp_path / "engine"
    with pytest.raises(onnx_export.ExportError, match="simulated"):
        onnx_export.export_engine(tiny_model_dir, out, progress=lambda line: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -- the onnxruntime backend -----------------------------------------------------------------------

@pytest.mark.slow
def test_onnxruntime_edit_equals_torch_edit(engines, image):
    """50-step direct inversion, then refine + reweight + LocalBlend with a 3-value self sweep."""
    config = ControlConfig(self_replace=(0.4, 0.6, 0.8), blend_words=("Devices", "Finding"))
    results = {}
    for kind, engine in engines.items():
        inversion = engine.invert(image, SOURCE, method="direct")
        results[kind] = (inversion, engine.edit(inversion, [TARGET], config))
    (inv_o, ort_result), (inv_t, torch_result) = results["onnxruntime"], results["torch"]
    np.testing.assert_allclose(inv_o.trajectory, inv_t.trajectory, atol=1e-3)
    assert len(ort_result.edits) == 3
    for a, b in zip([ort_result.reconstruction, *ort_result.edits], [torch_result.reconstruction, *torch_result.edits]):
        assert np.abs(a - b).max() / 2 <= 2 * ONE_LEVEL  # [-1, 1] → [0, 1]
    assert np.abs(ort_result.edits[0] - ort_result.reconstruction).max() > 10 * ONE_LEVEL  # not a vacuous comparison
    assert all(m is not None for m in ort_result.masks)
    assert ort_result.counts == torch_result.counts


@pytest.mark.slow
def test_onnxruntime_noise_blend_equals_torch(engines, image):
    """The noise-prediction blend masks (30-item UNet batches, one group; two thresholds) on both backends."""
    config = ControlConfig(self_replace=(0.5,), noise_blend=True, noise_blend_threshold=(0.8, 1.0))
    results = {}
    for kind, engine in engines.items():
        inversion = engine.invert(image, SOURCE, method="direct", sampler=engine.sampler(steps=8))
        results[kind] = engine.edit(inversion, [TARGET], config, RunLimits(max_batch=63))
    ort_result, torch_result = results["onnxruntime"], results["torch"]
    assert len(ort_result.edits) == len(config.noise_blend_threshold)  # one item per threshold
    for a, b, ma, mb in zip(ort_result.edits, torch_result.edits, ort_result.masks, torch_result.masks):
        assert 0 < ma.mean() < 1
        assert np.mean(ma != mb) < 0.01  # a pixel at the threshold may differ
        assert np.abs(a - b).max() / 2 <= 2 * ONE_LEVEL
    assert ort_result.counts == torch_result.counts


@pytest.mark.slow
@pytest.mark.parametrize("method", ["negative-prompt", "ddim"])
def test_onnxruntime_runs_the_other_inversions(engines, image, method):
    sampler = engines["onnxruntime"].sampler(steps=10)
    outs = []
    for kind in ("onnxruntime", "torch"):
        engine = engines[kind]
        inversion = engine.invert(image, SOURCE, method=method, sampler=sampler)
        outs.append(engine.edit(inversion, [TARGET], ControlConfig(self_replace=(0.5,))))
    assert np.abs(outs[0].edits[0] - outs[1].edits[0]).max() / 2 <= 2 * ONE_LEVEL
    assert outs[0].reconstruction_error == pytest.approx(outs[1].reconstruction_error, rel=1e-2, abs=1e-5)


@pytest.mark.slow
def test_cpu_arena_on_or_off_gives_the_same_noise(engine_dir):
    rng = np.random.default_rng(3)
    feeds = dict(latents=rng.standard_normal((3, 4, 16, 16), dtype=np.float32), timestep=np.array([301.0], np.float32),
                 text=rng.standard_normal((3, 77, 32), dtype=np.float32),
                 cross_alpha=np.zeros((1, 1, 77), np.float32), token_mapper=np.zeros((1, 1, 77, 77), np.float32),
                 refine_alpha=np.zeros((1, 1, 77), np.float32), equalizer=np.ones((1, 1, 77), np.float32),
                 self_replace=np.zeros((1, 1), np.float32))
    outs = []
    for arena in (True, False):
        backend = Engine.load(engine_dir, backend="onnxruntime", cpu_arena=arena).backend
        assert backend.cpu_arena is arena
        outs.append([backend.run("unet", **feeds)["noise"] for _ in range(2)])  # twice: reused arena memory
    # onnxruntime session settings pass through (here: pool threads that do not spin between calls)
    quiet = Engine.load(engine_dir, backend="onnxruntime", threads=2,
                        session_config={"session.intra_op.allow_spinning": "0"}).backend
    for noise in outs[0] + outs[1][1:]:
        np.testing.assert_array_equal(noise, outs[1][0])
    np.testing.assert_allclose(quiet.run("unet", **feeds)["noise"], outs[1][0], rtol=1e-5, atol=1e-6)  # 2 threads
    with pytest.raises(BackendError, match="torch backend takes none"):
        Engine.load(engine_dir, backend="torch", session_config={"session.intra_op.allow_spinning": "0"})


@pytest.mark.slow
def test_null_text_on_onnxruntime_points_to_the_torch_backend(engines, image):
    with pytest.raises(BackendError, match="needs gradients.*on torch"):
        engines["onnxruntime"].invert(image, SOURCE, method="null-text")


@pytest.mark.slow
def test_evaluate_edits_null_text_inversions_from_torch_on_onnxruntime(engines, tmp_path):
    """`prism-rt evaluate --invert-model`: null-text inversions made on torch from the checkpoint the
    engine was exported from, edited on ONNX Runtime, score as the evaluation all on torch; a
    checkpoint with other weights is refused."""
    from prism_export.tiny import TinySpec, save_tiny_model
    from prism_rt.errors import SettingsError
    from prism_rt.evaluate import Classifier
    from prism_bench.evaluate_cli import evaluate, phantom_cases

    classifier = Classifier.load(Path(__file__).resolve().parent.parent / "engines" / "phantom-demo" / "classifier.onnx")
    cases = phantom_cases(1, ["devices-remove"], engines["torch"].backend.info.image_size, seed0=1_000_003)
    settings = dict(steps=6, sweep=(0.5,), progress=None)
    (on_torch,) = evaluate(engines["torch"], classifier, cases, ["null-text"], **settings)
    on_ort, ddim = evaluate(engines["onnxruntime"], classifier, cases, ["null-text", "ddim"],
                            inverter=engines["torch"], **settings)
    assert on_ort["config"] == "null-text" and ddim["config"] == "ddim"
    assert on_ort["reconstruction_error"] == pytest.approx(on_torch["reconstruction_error"], rel=1e-2, abs=1e-6)
    assert on_ort["reconstruction_error"] < 0.9 * ddim["reconstruction_error"]  # the null-text inversion was used (0.79×)
    for key in ("l1", "psnr_db"):
        assert on_ort["identity"][key] == pytest.approx(on_torch["identity"][key], rel=2e-2)
    assert on_ort["classifier"]["p_counterfactual"] == pytest.approx(on_torch["classifier"]["p_counterfactual"], abs=1e-2)
    other = Engine.load(save_tiny_model(tmp_path / "other", TinySpec(seed=1)), backend="torch")
    with pytest.raises(SettingsError, match="--invert-model"):
        evaluate(engines["onnxruntime"], classifier, cases, ["null-text"], inverter=other, **settings)


@pytest.mark.slow
def test_padding_empty_edit_calls_equals_running_them(engines):
    backend = engines["onnxruntime"].backend
    rng = np.random.default_rng(3)
    inputs = dict(latents=rng.standard_normal((3, 4, 16, 16)).astype(np.float32), timestep=np.array([401.0], np.float32),
                  text=rng.standard_normal((3, 77, 32)).astype(np.float32),
                  cross_alpha=np.zeros((2, 0, 77), np.float32), token_mapper=np.zeros((2, 0, 77, 77), np.float32),
                  refine_alpha=np.zeros((2, 0, 77), np.float32), equalizer=np.zeros((2, 0, 77), np.float32),
                  self_replace=np.zeros((2, 0), np.float32))  # U = 1, G = 2, K = 0
    direct = backend.run("unet", **inputs)
    backend.pad_empty_edits = True
    try:
        padded = backend.run("unet", **inputs)
    finally:
        backend.pad_empty_edits = False
    for name in ("noise", "blend_maps"):
        assert padded[name].shape == direct[name].shape
        np.testing.assert_allclose(padded[name], direct[name], atol=1e-5)


@pytest.mark.slow
def test_batch_beyond_the_engine_range_is_refused_with_the_fix(engines):
    backend = engines["onnxruntime"].backend
    with pytest.raises(BackendError, match="at most 63.*--max-batch"):
        backend.run("text_encoder", input_ids=np.zeros((64, 77), np.int32))


@pytest.mark.slow
def test_unavailable_provider_names_what_to_install(engine_dir):
    with pytest.raises(BackendError, match="CUDAExecutionProvider.*CPUExecutionProvider.*onnxruntime-gpu"):
        Engine.load(engine_dir, backend="onnxruntime", device="cuda", self_max_queries=SELF_MAX_QUERIES)


@pytest.mark.slow
def test_self_max_queries_is_fixed_at_export(engine_dir):
    with pytest.raises(BackendError, match=f"self_max_queries {SELF_MAX_QUERIES}.*--self-max-queries"):
        Engine.load(engine_dir, backend="onnxruntime", self_max_queries=1024)


# -- the manifest check ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_changed_byte_of_the_unet_weights_is_refused(engine_dir, tmp_path):
    engine = _copy_engine(engine_dir, tmp_path)
    data = engine / "onnx" / "unet.onnx.data"
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(EngineMismatchError, match=r"unet\.onnx\.data.*SHA-256.*prism-export export"):
        Engine.load(engine, backend="onnxruntime", self_max_queries=SELF_MAX_QUERIES)


@pytest.mark.slow
def test_a_missing_graph_is_refused(engine_dir, tmp_path):
    engine = _copy_engine(engine_dir, tmp_path)
    (engine / "onnx" / "vae_decoder.onnx").unlink()
    with pytest.raises(EngineMismatchError, match=r"vae_decoder\.onnx.*missing.*prism-export export"):
        load_manifest(engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    del manifest["graphs"]["vae_decoder"]
    (engine / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="no vae_decoder graph"):
        load_manifest(engine)


@pytest.mark.slow
def test_graph_io_and_format_version_are_checked(engine_dir, tmp_path):
    engine = _copy_engine(engine_dir, tmp_path)
    path = engine / "manifest.json"
    original = json.loads(path.read_text())
    changed = json.loads(path.read_text())
    changed["graphs"]["unet"]["inputs"][0]["name"] = "sample"
    path.write_text(json.dumps(changed))
    with pytest.raises(EngineMismatchError, match=r"unet\.onnx has inputs"):
        load_manifest(engine)
    path.write_text(json.dumps(dict(original, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(EngineMismatchError, match="format version"):
        load_manifest(engine)
    path.unlink()
    with pytest.raises(EngineMismatchError, match="no manifest.json"):
        load_manifest(engine)


# -- the CLI, where torch cannot be imported -------------------------------------------------------

def _run_without_torch(*args) -> subprocess.CompletedProcess:
    code = BLOCK_TORCH + "from prism_rt.cli import main; sys.exit(main())"
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-c", code, *[str(a) for a in args]], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_cli_edit_on_onnxruntime_runs_without_torch(engine_dir, dicom_path, tmp_path):
    out = tmp_path / "out"
    proc = _run_without_torch("edit", "--model", engine_dir, "--backend", "onnxruntime", "--image", dicom_path,
                              "--prompt", SOURCE, "--target", TARGET, "--inversion", "direct", "--steps", 10,
                              "--self-max-queries", SELF_MAX_QUERIES,
                              "--self-replace", "0.5,0.7", "--blend-words", "Devices,Finding", "--no-progress", "--extras",
                              "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    names = {p.name for p in out.iterdir()}
    assert "reconstruction.png" in names and len([n for n in names if n.startswith("diff-")]) == 2, names


@pytest.mark.slow
def test_cli_info_summarises_the_engine(engine_dir):
    proc = _run_without_torch("info", engine_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert set(summary["graphs"]) == set(GRAPHS)
    assert summary["graphs"]["unet"]["precision"] == "fp32"
    assert summary["graphs"]["unet"]["parity_max_rel"] <= 1e-4
    assert summary["source"]["weights"]


def test_runtime_modules_import_without_torch():
    code = BLOCK_TORCH + textwrap.dedent("""
        import prism_rt.ort_backend, prism_rt.manifest, prism_rt.onnx_io
        assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]
        print('ok')
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_export_cli_reports_a_bad_model_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prism_export.cli", "export", "--model", tmp_path / "missing",
                           "--out", tmp_path / "engine"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: model path") and not (tmp_path / "engine").exists()
