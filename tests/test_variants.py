"""fp16 / int8 / int8-cpu engine variants: what the files hold, that the runtime picks them, and
that their measured quality against fp32 is what the manifest says.

One export of the tiny model with all variants (module fixture: export + calibration + quality,
~2.5 min on 2 cores), calibrated on the real radiograph RG1_UNCR.dcm at 10 steps.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from prism_rt.config import ControlConfig
from prism_rt.deployment import Deployment
from prism_rt.engine import Engine
from prism_rt.errors import BackendError
from prism_rt.manifest import EngineMismatchError, load_manifest

STEPS = 10
SWEEP = (0.5, 0.7)


@pytest.fixture(scope="module")
def calibration_dir(dicom_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    shutil.copy(dicom_path, folder / dicom_path.name)
    (folder / "captions.json").write_text(json.dumps({dicom_path.name: {
        "prompt": "Chest X-ray showing Support Devices", "targets": ["Chest X-ray showing No Finding"]}}))
    return folder


@pytest.fixture(scope="module")
def variant_engine(tiny_model_dir, calibration_dir, tmp_path_factory):
    from prism_export.onnx_export import export_engine
    from prism_export.variants import VariantSettings

    lines: list[str] = []
    settings = VariantSettings(calibration_images=calibration_dir, calibration_count=1, calibration_steps=STEPS,
                               calibration_samples=12, self_replace=SWEEP)
    out = export_engine(tiny_model_dir, tmp_path_factory.mktemp("engines") / "tiny-variants", progress=lines.append,
                        precisions=("fp16", "int8", "int8-cpu"), variant_settings=settings)
    return out, lines


@pytest.fixture(scope="module")
def engine_dir(variant_engine) -> Path:
    return variant_engine[0]


def _onnx(path: Path, weights: bool = False):
    import onnx

    return onnx.load(str(path), load_external_data=weights)


def _counterfactuals(engine_dir: Path, precision: str, dicom_path: Path) -> np.ndarray:
    """What the quality run does: direct inversion, the calibration edit, gray [0,1] images."""
    engine = Engine.load(engine_dir, backend="onnxruntime", precision=precision)
    inversion = engine.invert(dicom_path, "Chest X-ray showing Support Devices", method="direct",
                              sampler=engine.sampler(steps=STEPS))
    result = engine.edit(inversion, ["Chest X-ray showing No Finding"], ControlConfig(self_replace=SWEEP))
    return np.clip((np.stack(result.edits).mean(1) + 1) / 2, 0, 1)


@pytest.mark.slow
def test_export_writes_the_variants_side_by_side_with_progress(variant_engine):
    engine_dir, lines = variant_engine
    assert {p.name for p in engine_dir.iterdir()} >= {"onnx", "onnx-fp16", "onnx-int8", "onnx-int8-cpu", "manifest.json"}
    assert not [p for p in engine_dir.iterdir() if p.name.startswith(".")], "staging folders left behind"
    for precision in ("fp16", "int8", "int8-cpu"):
        assert any(line.startswith(f"{precision}: built") and "PSNR" in line for line in lines), lines
    manifest = load_manifest(engine_dir)
    assert manifest.precisions == ("fp32", "fp16", "int8", "int8-cpu")
    for precision in manifest.precisions[1:]:  # every variant's files are hashed and its I/O checked
        loaded = load_manifest(engine_dir, precision=precision)
        expected = {"fp16": dict.fromkeys(loaded.graphs, "fp16")}.get(
            precision, {"text_encoder": "fp32", "vae_encoder": "fp32", "vae_decoder": "fp32", "unet": precision})
        assert loaded.precision == expected


@pytest.mark.slow
def test_fp16_graphs_hold_half_weights_and_take_float32_io(engine_dir):
    from onnx import TensorProto

    for graph in ("text_encoder", "vae_encoder", "vae_decoder", "unet"):
        model = _onnx(engine_dir / "onnx-fp16" / f"{graph}.onnx")
        floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
        dtypes = {t.data_type for t in model.graph.initializer  # weight matrices / kernels
                  if len(t.dims) >= 2 and t.data_type in floats}
        assert dtypes == {TensorProto.FLOAT16}, (graph, dtypes)
        assert {v.type.tensor_type.elem_type for v in model.graph.output} == {TensorProto.FLOAT}


@pytest.mark.slow
def test_fp16_keeps_norms_in_float32_where_measured_and_records_it(engine_dir):
    """Each fp16 graph's policy is in the manifest: the largest |x| into a normalisation / softmax
    of the fp32 graph, and the ops kept in float32 because of it; the graph holds what it says."""
    from onnx import TensorProto

    from prism_export.fp16_policy import OVERFLOW_MARGIN
    from prism_export.trt_ops import tensor_types
    from prism_export.variant_config import FP16_FP32_OPS_DEFAULT

    graphs = json.loads((engine_dir / "manifest.json").read_text())["variants"]["fp16"]["graphs"]
    for name, entry in graphs.items():
        policy = entry["made_by"]["fp32_policy"]
        assert policy["candidates"] == list(FP16_FP32_OPS_DEFAULT) and policy["largest_input"] > 0
        assert policy["fp32_ops"] == (list(FP16_FP32_OPS_DEFAULT) if policy["largest_input"] > OVERFLOW_MARGIN else [])
        model = _onnx(engine_dir / entry["file"])
        types = tensor_types(model)
        kept = {types.get(n.input[0]) for n in model.graph.node if n.op_type in FP16_FP32_OPS_DEFAULT}
        assert kept <= {TensorProto.FLOAT if policy["fp32_ops"] else TensorProto.FLOAT16, None}, (name, kept)


@pytest.mark.slow
def test_int8_unet_is_symmetric_qdq_and_int8_cpu_has_uint8_activations(engine_dir):
    from onnx import TensorProto, numpy_helper

    for precision, activation in (("int8", TensorProto.INT8), ("int8-cpu", TensorProto.UINT8)):
        model = _onnx(engine_dir / f"onnx-{precision}" / "unet.onnx", weights=True)
        inits = {t.name: t for t in model.graph.initializer}
        quant = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert len(quant) > 50
        zero_points = [inits[n.input[2]] for n in quant]
        assert {z.data_type for z in zero_points} == {activation}
        if precision == "int8":  # TensorRT: zero points of 0 everywhere, weights and activations
            dq_zero = [inits[n.input[2]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
            assert all(not numpy_helper.to_array(z).any() for z in zero_points + dq_zero)
        weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                   and inits[n.input[0]].data_type == TensorProto.INT8 and len(inits[n.input[0]].dims) >= 2]
        assert weights and all(len(inits[n.input[1]].dims) == 1 for n in weights), "weights are per-channel"


@pytest.mark.slow
def test_every_op_and_qdq_type_of_the_tensorrt_variants_is_in_tensorrts_table(engine_dir):
    """fp16 and int8 are what TensorRT builds: every op of every graph they hold is in the parser's
    operator table with a type it takes (no DequantizeLinear of an int32 bias), and the int8 Q/DQ
    pairs sit only on the weight and activation inputs of Conv / MatMul / Gemm."""
    from onnx import TensorProto

    from prism_export.trt_ops import tensor_types, unsupported_ops, unsupported_types

    for folder in ("onnx", "onnx-fp16", "onnx-int8"):
        for path in sorted((engine_dir / folder).glob("*.onnx")):
            if path.name.endswith(".cpu.onnx"):
                continue  # the CPU twins are onnxruntime-only (com.microsoft ops), never built by TensorRT
            model = _onnx(path)
            assert unsupported_ops(model) == [], path
            assert unsupported_types(model) == [], path
    model = _onnx(engine_dir / "onnx-int8" / "unet.onnx")
    types, inits = tensor_types(model), {t.name for t in model.graph.initializer}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            users.setdefault(name, []).append((node.op_type, i))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) > 50 and all(types[n.input[0]] == TensorProto.INT8 for n in dq)
    for node in dq:
        assert all(op in ("Conv", "MatMul", "Gemm") and i in (0, 1) for op, i in users[node.output[0]]), node.name
        assert (node.input[0] in inits) == all(i == 1 for _, i in users[node.output[0]])  # weights are constants
    assert json.loads((engine_dir / "manifest.json").read_text())["variants"]["int8"]["quantization"]["biases"] == "float"


@pytest.mark.slow
def test_sensitive_layers_stay_in_float(engine_dir):
    """Time embedding, conv_in/out and the attention-probability products are never quantized."""
    fp32 = _onnx(engine_dir / "onnx" / "unet.onnx")
    scopes = {n.name: next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
              for n in fp32.graph.node}
    sensitive = {name for name, scope in scopes.items()
                 if any(s in scope for s in ("time_embedding", "time_emb_proj", "conv_in", "conv_out", "conv_shortcut",
                                             "proj_in", "proj_out"))}
    assert any("proj_in" in scopes[n] for n in sensitive) and any("proj_out" in scopes[n] for n in sensitive)
    model = _onnx(engine_dir / "onnx-int8" / "unet.onnx")
    producers = {out: n for n in model.graph.node for out in n.output}
    quantized_inputs = lambda node: [i for i in node.input if i in producers and producers[i].op_type == "DequantizeLinear"]
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm", "Softmax", "Einsum")]
    # sensitive layers keep float weights and compute in float (their activation input may still
    # arrive through a Q/DQ pair that a quantized neighbour shares on the same tensor)
    weight_dq = lambda node: len(node.input) > 1 and node.input[1] in producers \
        and producers[node.input[1]].op_type == "DequantizeLinear"  # noqa: E731
    assert [n.name for n in compute if n.name in sensitive and weight_dq(n)] == []
    assert [n.name for n in compute if n.op_type in ("Softmax", "Einsum") and quantized_inputs(n)] == []
    assert sum(bool(quantized_inputs(n)) for n in compute if n.op_type == "Conv") > 10  # convolutions are quantized
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    kept = manifest["variants"]["int8"]["quantization"]["kept_float"]
    assert kept["sensitive_scope"] >= 4 and kept["activation_product"] >= 4


@pytest.mark.slow
def test_int8_float_scopes_match_whole_module_path_components(engine_dir):
    from prism_export.quantization import in_scope, module_paths, unet_nodes_to_quantize
    from prism_export.variant_config import UNET_FLOAT_SCOPES, VariantError

    # whole dotted components, by hand: a block's number is not a prefix of another's
    assert in_scope(["unet", "unet.up_blocks.1.resnets.0.conv1"], "up_blocks.1")
    assert not in_scope(["unet", "unet.up_blocks.10.resnets.0.conv1", "unet.up_blocks.11"], "up_blocks.1")
    assert not in_scope(["unet.down_blocks.0.attentions.0.proj_input"], "proj_in")
    # "*" is any one component
    shortcut = "up_blocks.3.resnets.*.conv_shortcut"
    assert in_scope(["unet", "unet.up_blocks.3", "unet.up_blocks.3.resnets.2.conv_shortcut"], shortcut)
    assert not in_scope(["unet.up_blocks.2.resnets.2.conv_shortcut"], shortcut)
    assert not in_scope(["unet.up_blocks.3.resnets.conv_shortcut", "unet.up_blocks.3.resnets.0.1.conv_shortcut"], shortcut)
    assert not in_scope(["unet.up_blocks.3.resnets.0.conv_shortcut_x"], shortcut)

    fp32 = _onnx(engine_dir / "onnx" / "unet.onnx")
    paths = {n.name: module_paths(n) for n in fp32.graph.node}
    default, _ = unet_nodes_to_quantize(fp32)
    wider, summary = unet_nodes_to_quantize(fp32, UNET_FLOAT_SCOPES + ("up_blocks.1",))
    # exactly the default's nodes less those inside up_blocks.1
    assert wider == [n for n in default if not any(p == "unet.up_blocks.1" or p.startswith("unet.up_blocks.1.")
                                                   for p in paths[n])]
    assert 0 < len(wider) < len(default) and summary["kept_float_scopes"][-1] == "up_blocks.1"
    assert not any("proj_in" in p or "proj_out" in p for n in default for p in paths[n])
    # a wildcard scope: the last output block's shortcuts float, the other shortcuts quantized
    is_shortcut = lambda n: any("conv_shortcut" in p for p in paths[n])  # noqa: E731
    fewer, _ = unet_nodes_to_quantize(fp32, [s for s in UNET_FLOAT_SCOPES if s != "conv_shortcut"]
                                      + ["up_blocks.3.resnets.*.conv_shortcut"])
    assert not any(is_shortcut(n) for n in default)
    assert set(default) < set(fewer) and all(is_shortcut(n) for n in set(fewer) - set(default))
    assert any(is_shortcut(n) and p.startswith("unet.up_blocks.3.") for n in paths for p in paths[n])  # there to keep
    assert not any(p.startswith("unet.up_blocks.3.") for n in fewer if is_shortcut(n) for p in paths[n])
    with pytest.raises(VariantError, match="proj_inn"):
        unet_nodes_to_quantize(fp32, ("proj_inn",))


@pytest.mark.slow
def test_a_misspelt_float_scope_fails_before_the_calibration_run(engine_dir, tmp_path, capsys):
    from prism_export.cli import main

    copy = Path(shutil.copytree(engine_dir, tmp_path / "engine"))
    before = sorted((p.relative_to(copy), p.stat().st_size) for p in copy.rglob("*"))
    code = main(["variants", "--engine", str(copy), "--precision", "int8-cpu", "--int8-float-scopes", "proj_in,up_blockz.3"])
    err = capsys.readouterr()
    assert code != 0 and "up_blockz.3" in err.err and "fp32 reference" not in err.out
    assert sorted((p.relative_to(copy), p.stat().st_size) for p in copy.rglob("*")) == before


def _unet_feeds(engine_dir: Path, calibration_dir: Path) -> list[dict]:
    """UNet inputs recorded from a short direct inversion + edit of the calibration radiograph."""
    from prism_export import calibration, variants

    settings = variants.VariantSettings(calibration_images=calibration_dir, calibration_count=1, calibration_steps=4,
                                        self_replace=(0.6,))
    engine = Engine.load(engine_dir, backend="onnxruntime", threads=1)
    run = calibration.invert_and_edit(engine, calibration.load_calibration_items(calibration_dir, 1), settings, record=True)
    return [feeds for feeds, _ in calibration.spread(run.unet_calls, 6)]


def _session(path: Path, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _noise(session, feeds) -> list[np.ndarray]:
    return [session.run(["noise"], feed)[0].astype(np.float64) for feed in feeds]


def _rel(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(((g - r) ** 2).sum() for g, r in zip(got, ref)) / sum((r ** 2).sum() for r in ref)))


@pytest.mark.slow
def test_calibration_ranges_are_the_min_and_max_of_each_quantized_tensor(engine_dir, calibration_dir):
    """calibrate_ranges reduces inside the graph; the reference makes the tensors themselves
    outputs and takes numpy's min / max over every feed."""
    import onnx

    from prism_export import quantization, smoothing

    src = engine_dir / "onnx" / "unet.onnx"
    feeds = _unet_feeds(engine_dir, calibration_dir)
    nodes, _ = quantization.unet_nodes_to_quantize(_onnx(src))
    ranges = quantization.calibrate_ranges(src, feeds, nodes)
    wanted = set(nodes)
    tensors = sorted({t for n in _onnx(src).graph.node if n.name in wanted for t in (n.input[0], n.output[0])})
    model = _onnx(src)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    lo, hi = {t: np.inf for t in tensors}, {t: -np.inf for t in tensors}
    for values in smoothing.run_beside(src, model, tensors, feeds, "reference"):
        for t, v in values.items():
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
    assert len(ranges) == len(tensors) > 2 * 10 and len({t for t in tensors if hi[t] > lo[t]}) == len(tensors)
    for t in tensors:
        # calibrate_ranges runs the attention-fused graph: scale·(q·kᵀ) there, (√s·q)·(√s·kᵀ) in the
        # reference — the same numbers to float rounding (measured 1.0e-6 relative), not bit for bit
        assert ranges[t] == pytest.approx((min(lo[t], 0.0), max(hi[t], 0.0)), rel=1e-5, abs=1e-6), t


@pytest.mark.slow
def test_rescaling_changes_the_weights_not_the_function_and_folds_exactly(engine_dir, calibration_dir, tmp_path):
    """SmoothQuant smoothing + output equalization rewrite the float UNet into an equivalent graph
    with other weights; after quantization, folding the convolutions' Muls into per-channel Q/DQ
    scales changes nothing but float rounding."""
    from onnx import numpy_helper

    from prism_export import quantization, smoothing

    src = engine_dir / "onnx" / "unet.onnx"
    feeds = _unet_feeds(engine_dir, calibration_dir)
    nodes, _ = quantization.unet_nodes_to_quantize(_onnx(src))
    rescaled = tmp_path / "rescaled.onnx"
    info = smoothing.rescale_unet(src, rescaled, feeds, nodes, alpha=0.7)
    reference = _noise(_session(src), feeds)
    assert _rel(_noise(_session(rescaled), feeds), reference) < 1e-5
    before = {t.name: numpy_helper.to_array(t) for t in _onnx(src, weights=True).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in _onnx(rescaled, weights=True).graph.initializer}
    convs = [n for n in _onnx(src).graph.node if n.name in set(nodes) and n.op_type == "Conv"]
    changed = [n.name for n in convs if not np.allclose(before[n.input[1]], after[n.input[1]], rtol=1e-2)]
    assert info["convolutions"] == len(convs) > 10 and len(changed) == len(convs)
    assert info["matmuls_folded_into_norms"] > 0 and info["matmuls_with_mul"] > 0

    quantized = tmp_path / "q" / "unet.onnx"
    quantization.quantize_unet(rescaled, quantized, feeds, "int8-cpu", smoothing=None)
    unfolded = _noise(_session(quantized), feeds)
    folded_info = smoothing.fold_rescaling(quantized)
    assert folded_info["smoothing_into_quantize"] == folded_info["equalization_into_dequantize"] == len(convs)
    assert folded_info["muls_left"] == info["matmuls_with_mul"]
    # a rounding flip early on re-rolls every later rounding, so the folded graph's output is another
    # draw of the same quantization noise (exactness is checked on one layer below), not a copy
    assert _rel(_noise(_session(quantized), feeds), reference) < 1.2 * _rel(unfolded, reference) < 0.3


@pytest.mark.slow
def test_cpu_rewrites_split_geglu_and_fuse_gelu_exactly(engine_dir, calibration_dir, tmp_path):
    """The GEGLU projection split into value / gate MatMuls and the erf GELU fused into one
    com.microsoft.Gelu compute what the exported graph computes."""
    import collections

    import onnx

    from prism_export.cpu_rewrites import fuse_gelu, split_geglu

    src = engine_dir / "onnx" / "unet.onnx"
    model = onnx.load(str(src))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    split, fused = split_geglu(model), fuse_gelu(model)
    after = collections.Counter(n.op_type for n in model.graph.node)
    assert split == fused == ops["Erf"] > 0  # one GEGLU per transformer block
    assert after["Split"] == ops["Split"] - split and after["Erf"] == 0 and after["Gelu"] == fused
    assert after["MatMul"] == ops["MatMul"] + split
    read = {i for n in model.graph.node for i in n.input}
    assert [t.name for t in model.graph.initializer if t.name not in read] == []  # no orphaned constants
    path = tmp_path / "rewritten.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="rewritten.onnx.data")
    feeds = _unet_feeds(engine_dir, calibration_dir)
    assert _rel(_noise(_session(path), feeds), _noise(_session(src), feeds)) < 1e-5


def test_folding_moves_the_rescaling_into_per_channel_qdq_scales(tmp_path):
    """One hand-made layer x -> Mul(1/t) -> Q -> DQ -> Conv -> Q -> DQ -> Mul(1/s): folded, the Muls
    are gone, Q / DQ carry σ·t / σ/s per channel (axis 1), and the output is the same up to rare
    one-step rounding flips."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from prism_export.smoothing import fold_rescaling

    rng = np.random.default_rng(0)
    c_in, c_out = 3, 4
    t = np.array([0.5, 2.0, 8.0], np.float32)
    s = np.array([1.0, 4.0, 0.25, 16.0], np.float32)
    consts = {"inv_t": (1 / t).reshape(1, -1, 1, 1), "inv_s": (1 / s).reshape(1, -1, 1, 1),
              "x_scale": np.array(0.02, np.float32), "x_zero": np.array(128, np.uint8),
              "y_scale": np.array(0.05, np.float32), "y_zero": np.array(120, np.uint8),
              "w": rng.integers(-127, 128, (c_out, c_in, 3, 3)).astype(np.int8),
              "w_scale": np.full(c_out, 0.01, np.float32), "w_zero": np.zeros(c_out, np.int8)}
    nodes = [helper.make_node("Mul", ["x", "inv_t"], ["xs"], name="conv/prism_smooth"),
             helper.make_node("QuantizeLinear", ["xs", "x_scale", "x_zero"], ["xq"], name="xq"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="xd"),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], name="wd", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["yc"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["yc", "y_scale", "y_zero"], ["yq"], name="yq"),
             helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["yd"], name="yd"),
             helper.make_node("Mul", ["yd", "inv_s"], ["y"], name="conv/prism_equalize")]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c_in, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c_out, 6, 6])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    path = tmp_path / "layer.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = (rng.standard_normal((2, c_in, 6, 6)) * t.reshape(1, -1, 1, 1)).astype(np.float32)
    run = lambda: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]  # noqa: E731
    before = run()
    assert fold_rescaling(path) == {"smoothing_into_quantize": 1, "equalization_into_dequantize": 1, "muls_left": 0}
    folded = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    by_name = {n.name: n for n in folded.graph.node}
    assert not [n for n in folded.graph.node if n.op_type == "Mul"]
    assert np.allclose(inits[by_name["xq"].input[1]], 0.02 * t) and inits[by_name["xq"].input[2]].tolist() == [128] * c_in
    assert np.allclose(inits[by_name["yd"].input[1]], 0.05 / s) and inits[by_name["yd"].input[2]].tolist() == [120] * c_out
    assert all(any(a.name == "axis" and a.i == 1 for a in by_name[k].attribute) for k in ("xq", "yd"))
    assert by_name["xd"].input[1] == "x_scale" and by_name["yq"].input[1] == "y_scale"  # the conv's own scales stay
    after = run()
    step = (0.05 / s).reshape(1, -1, 1, 1)
    flipped = np.abs(after - before) > 1e-6 * np.abs(before).max()
    assert flipped.mean() < 0.02 and np.all(np.abs(after - before) <= 1.01 * np.broadcast_to(step, before.shape) + 1e-6)


def _linear_layer(tmp_path, name: str, act_scale_shape=(), bias_from_input: bool = False) -> Path:
    """x -> Q -> DQ -> MatMul(DQ(w: int8, per-column scale, axis 1)) -> Add(bias) -> y, as
    quantize_static writes a quantized linear layer with a float output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    k, n = 16, 8
    consts = {"x_scale": np.full(act_scale_shape, 0.03, np.float32), "x_zero": np.full(act_scale_shape, 131, np.uint8),
              "w": rng.integers(-127, 128, (k, n)).astype(np.int8), "w_scale": rng.uniform(0.005, 0.02, n).astype(np.float32),
              "w_zero": np.zeros(n, np.int8)}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])]
    if bias_from_input:
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [n]))
    else:
        consts["bias"] = rng.standard_normal(n).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="xq", axis=-1),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="xd", axis=-1),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], name="wd", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["xw"], name="linear"),
             helper.make_node("Add", ["xw", "bias"], ["y"], name="linear/bias")]
    graph = helper.make_graph(nodes, "linear", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, n])],
                              [numpy_helper.from_array(v, key) for key, v in consts.items()])
    path = tmp_path / name
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_a_quantized_linear_layer_takes_its_bias_into_the_integer_product(tmp_path):
    """Fused, the layer is one MatMulIntegerToFloat reading the quantized input, the int8 weights,
    both scales and zero points and the bias, and computes what DQ · DQ → MatMul → Add computes; a
    per-channel activation scale or a bias that is not a constant is left as it is."""
    import onnx
    import onnxruntime as ort

    from prism_export.cpu_rewrites import fuse_quantized_matmul_bias
    from prism_export.onnx_graph import rewrite_file

    x = {"x": np.random.default_rng(2).standard_normal((2, 5, 16)).astype(np.float32)}
    run = lambda p, feeds=x: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]  # noqa: E731
    path = _linear_layer(tmp_path, "layer.onnx")
    before = run(path)
    # the hand-computed reference: dequantize both, multiply, add the bias
    model = onnx.load(str(path))
    c = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    xq = np.clip(np.round(x["x"] / 0.03) + 131, 0, 255)
    reference = ((xq - 131) * 0.03) @ (c["w"].astype(np.float32) * c["w_scale"]) + c["bias"]
    assert np.allclose(before, reference, rtol=1e-5, atol=1e-5)
    assert rewrite_file(path, lambda m, _: fuse_quantized_matmul_bias(m)) == 1
    fused = onnx.load(str(path)).graph
    assert [(n.op_type, n.domain) for n in fused.node] == [("QuantizeLinear", ""), ("MatMulIntegerToFloat", "com.microsoft")]
    assert list(fused.node[1].input) == ["xq", "w", "x_scale", "w_scale", "x_zero", "w_zero", "bias"]
    assert np.allclose(run(path), before, rtol=1e-6, atol=1e-6)
    for name, kwargs in (("per-channel.onnx", {"act_scale_shape": (16,)}), ("bias-input.onnx", {"bias_from_input": True})):
        kept = _linear_layer(tmp_path, name, **kwargs)
        assert fuse_quantized_matmul_bias(onnx.load(str(kept))) == 0


@pytest.mark.slow
def test_int8_cpu_convolutions_fuse_with_folded_scales_and_matmuls_keep_float_outputs(engine_dir, tmp_path):
    """What makes int8-cpu fast survives the rescaling: onnxruntime still fuses every quantized
    convolution into QLinearConv (per-channel scales sit on the Q before / DQ after it) and runs
    every quantized MatMul as MatMulIntegerToFloat, those with a bias with it inside; no rescaling
    Mul is left at a convolution."""
    import collections

    from prism_export.onnx_graph import graph_maps

    manifest = json.loads((engine_dir / "manifest.json").read_text())
    made = manifest["variants"]["int8-cpu"]["quantization"]
    rescaling = made["rescaling"]
    assert rescaling["alpha"] == 0.7 and made["matmul_outputs"] == "float"
    assert rescaling["folded"]["smoothing_into_quantize"] == rescaling["convolutions"] > 10
    assert rescaling["folded"]["equalization_into_dequantize"] == rescaling["convolutions"]
    assert made["rewrites"]["split_geglu"] == made["cpu_gelu"]["fused_gelu"] == rescaling["matmuls_folded_into_gated_values"] > 0
    path = engine_dir / "onnx-int8-cpu" / "unet.onnx"
    graph = _onnx(path).graph
    axis_1 = lambda n: any(a.name == "axis" and a.i == 1 for a in n.attribute)  # noqa: E731
    smoothed = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[1].endswith("/smooth_scale") and axis_1(n)]
    equalized = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[1].endswith("/equalize_scale")
                 and axis_1(n)]
    assert len(smoothed) == len(equalized) == rescaling["convolutions"]
    convs = {n.name for n in _onnx(engine_dir / "onnx" / "unet.onnx").graph.node if n.op_type == "Conv"}
    left = [n.name for n in graph.node if n.op_type == "Mul" and "/prism_" in n.name]
    assert len(left) == rescaling["matmuls_with_mul"] and not [m for m in left if m.split("/prism_")[0] in convs]
    _session(path, optimized=tmp_path / "optimized.onnx")
    ops = collections.Counter(n.op_type for n in _onnx(tmp_path / "optimized.onnx").graph.node)
    quantized = collections.Counter(n.op_type for n in _onnx(engine_dir / "onnx" / "unet.onnx").graph.node
                                    if n.name in set(_quantized_nodes(engine_dir)))
    assert ops["QLinearConv"] == quantized["Conv"] == rescaling["convolutions"]
    assert ops["QLinearMatMul"] == 0 and ops["MatMulIntegerToFloat"] >= quantized["MatMul"]
    assert ops["Erf"] == 0  # the GELUs stay fused
    # every quantized linear layer with a bias has it inside its integer product: no MatMul → Add(bias) left
    stored = collections.Counter(n.op_type for n in graph.node)
    inits = {t.name: list(t.dims) for t in graph.initializer}
    _, consumers = graph_maps(graph)
    biased = [n for n in graph.node if n.op_type == "MatMul" and len(consumers[n.output[0]]) == 1
              and consumers[n.output[0]][0].op_type == "Add"
              and any(len(inits.get(i, [])) == 1 for i in consumers[n.output[0]][0].input)]
    assert biased == [] and stored["MatMulIntegerToFloat"] == made["cpu_matmul_bias"]["fused"] > 0
    assert all(len(n.input) == 7 and n.input[6] for n in graph.node if n.op_type == "MatMulIntegerToFloat")


def _quantized_nodes(engine_dir: Path) -> list[str]:
    from prism_export.quantization import unet_nodes_to_quantize

    return unet_nodes_to_quantize(_onnx(engine_dir / "onnx" / "unet.onnx"))[0]


@pytest.mark.slow
def test_int8_cpu_smoothing_option(engine_dir, calibration_dir, tmp_path, capsys):
    from prism_export.cli import main
    from prism_export.variants import VariantError, VariantSettings

    with pytest.raises(VariantError, match="int8-cpu-smoothing"):
        VariantSettings(int8_cpu_smoothing=1.5)
    copy = Path(shutil.copytree(engine_dir, tmp_path / "engine"))
    before = (copy / "manifest.json").read_bytes()
    with pytest.raises(SystemExit) as exit_:  # argparse: usage + message, exit status 2
        main(["variants", "--engine", str(copy), "--precision", "int8-cpu", "--int8-cpu-smoothing", "strong"])
    assert exit_.value.code == 2 and "'strong' is neither a number in [0, 1] nor 'off'" in capsys.readouterr().err
    assert (copy / "manifest.json").read_bytes() == before
    # off: the plain quantization, no rescaling and no per-channel activation scales
    code = main(["variants", "--engine", str(copy), "--precision", "int8-cpu", "--int8-cpu-smoothing", "off",
                 "--calibration-images", str(calibration_dir), "--calibration-count", "1", "--calibration-steps", "2",
                 "--calibration-samples", "2", "--calibration-self-replace", "0.5"])
    assert code == 0
    made = json.loads((copy / "manifest.json").read_text())["variants"]["int8-cpu"]
    assert made["settings"]["int8_cpu_smoothing"] is None and "rescaling" not in made["quantization"]
    graph = _onnx(copy / "onnx-int8-cpu" / "unet.onnx").graph
    assert not [n for n in graph.node if "/prism_" in n.name or any(a.name == "axis" for a in n.attribute)
                and n.op_type == "QuantizeLinear"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-cpu"])
def test_variant_counterfactuals_match_the_manifest_quality(engine_dir, dicom_path, precision):
    """Running the variant reproduces the PSNR/SSIM the export measured, against fp32 run now."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    quality = load_manifest(engine_dir).quality(precision)
    reference = _counterfactuals(engine_dir, "fp32", dicom_path)
    got = _counterfactuals(engine_dir, precision, dicom_path)
    psnr = [peak_signal_noise_ratio(r, g, data_range=1.0) for r, g in zip(reference, got)]
    ssim = [structural_similarity(r, g, data_range=1.0) for r, g in zip(reference, got)]
    recorded = quality["images"]["counterfactuals"]
    assert recorded["count"] == len(psnr)
    assert min(psnr) == pytest.approx(recorded["psnr_db_min"], abs=0.05)
    assert min(ssim) == pytest.approx(recorded["ssim_min"], abs=1e-3)
    floor = {"fp16": 30.0, "int8": 15.0, "int8-cpu": 15.0}[precision]  # int8 on random weights: see README
    assert min(psnr) >= floor
    noise = quality["noise"]
    assert noise["calls"] > 0 and 0 < noise["rms_rel"] <= (0.01 if precision == "fp16" else 0.3)


@pytest.mark.slow
def test_cli_edit_runs_each_precision_and_records_it(engine_dir, dicom_path, tmp_path):
    from prism_rt.cli import main

    for precision in ("fp32", "fp16", "int8", "int8-cpu"):
        out = tmp_path / precision
        code = main(["edit", "--model", str(engine_dir), "--backend", "onnxruntime", "--precision", precision,
                     "--inversion", "direct", "--image", str(dicom_path), "--prompt", "Chest X-ray showing Support Devices",
                     "--target", "Chest X-ray showing No Finding", "--steps", "4", "--self-replace", "0.6",
                     "--out", str(out), "--no-progress"])
        assert code == 0
        result = json.loads((out / "result.json").read_text())
        assert precision in json.dumps(result)


@pytest.mark.slow
def test_a_precision_the_engine_lacks_names_the_command_that_adds_it(engine_dir, tmp_path, dicom_path, capsys):
    from prism_rt.cli import main

    bare = tmp_path / "bare"
    shutil.copytree(engine_dir, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["variants"]["int8"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    code = main(["edit", "--model", str(bare), "--backend", "onnxruntime", "--precision", "int8", "--inversion", "direct",
                 "--image", str(dicom_path), "--prompt", "a", "--target", "b", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "prism-export variants" in err and "int8" in err
    assert not (tmp_path / "out").exists()


def _profile(text: str) -> dict[str, list[int]]:
    """onnxruntime's TensorRT profile string ``name:AxBxC,name2:…`` read back."""
    return {name: [int(d) for d in dims.split("x")] for name, dims in (item.split(":") for item in text.split(","))}


@pytest.mark.slow
def test_tensorrt_options_carry_the_manifest_profile_and_precision_flags(engine_dir):
    """What the TensorRT EP is given per graph (built without a GPU: a pure function of the manifest)."""
    from prism_rt.ort_backend import tensorrt_options

    raw = json.loads((engine_dir / "manifest.json").read_text())
    for precision in ("fp32", "fp16", "int8"):
        manifest = load_manifest(engine_dir, precision=precision)
        assert manifest.graphs["unet"].precision == precision
        for graph, entry in manifest.graphs.items():
            options = tensorrt_options(manifest, graph, 1, None)
            assert options["device_id"] == 1 and options["trt_engine_cache_enable"] is False
            assert "trt_engine_cache_path" not in options
            assert options["trt_fp16_enable"] is (entry.precision in ("fp16", "int8"))  # int8: fp16 outside Q/DQ
            assert options["trt_int8_enable"] is (entry.precision == "int8")
            profile = Deployment.from_json(raw["deployment"]).profile(entry)  # what the export recorded
            assert {t.name for t in entry.inputs} == set(profile), graph  # every input has its range
            for level in ("min", "opt", "max"):
                assert _profile(options[f"trt_profile_{level}_shapes"]) == {n: p[level] for n, p in profile.items()}
    assert raw["deployment"] == {"max_edits": 5, "max_groups": 1, "max_batch": None, "unet_batch": 12}
    unet = raw["graphs"]["unet"]["profile"]
    assert unet["latents"]["min"][0] == 1 and unet["latents"]["max"][0] == 63  # the exported batch range


@pytest.mark.slow
def test_tensorrt_engine_cache_is_one_folder_per_graph_file_setting_and_version(engine_dir, tmp_path, monkeypatch):
    """onnxruntime names a cached engine by the graph's path and the GPU only: the folder must change
    whenever the graph file, its precision / build settings, onnxruntime or TensorRT change."""
    from prism_rt import ort_backend as ob

    fp32, int8 = (load_manifest(engine_dir, precision=p) for p in ("fp32", "int8"))
    options = ob.tensorrt_options(int8, "unet", 0, tmp_path)
    folder = Path(options["trt_engine_cache_path"])
    assert options["trt_engine_cache_enable"] is True and options["trt_timing_cache_enable"] is True
    assert folder.parent == tmp_path and Path(options["trt_timing_cache_path"]).parent == tmp_path
    files = f"{int8.graphs['unet'].sha256}:{int8.graphs['unet'].data_sha256}"  # the graph and its weights
    assert folder.name.startswith("unet-int8-" + hashlib.sha256(files.encode()).hexdigest()[:12])
    folders = {
        folder,
        ob.trt_cache_folder(fp32, "unet", 0, tmp_path),  # another graph file and precision
        ob.trt_cache_folder(fp32, "vae_decoder", 0, tmp_path),
        ob.trt_cache_folder(int8, "unet", 0, tmp_path, ort_version="0.0.1"),
        ob.trt_cache_folder(int8, "unet", 0, tmp_path, trt_version="0.0.1"),
    }
    assert len(folders) == 5
    assert ob.trt_cache_folder(int8, "unet", 3, tmp_path) == folder  # the device is not a build setting
    # another profile (same file) is another build
    assert ob.trt_cache_folder(int8, "unet", 0, tmp_path, deployment=Deployment(max_edits=2)) != folder

    # where it goes by default: the engine folder, or the user's cache when that is read-only
    assert ob.default_trt_cache_root(fp32) == engine_dir / "trt-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(ob.os, "access", lambda path, mode: False)
    assert ob.default_trt_cache_root(fp32) == tmp_path / "xdg" / "prism_rt" / "trt" / engine_dir.name
    assert ob._trt_cache_root(fp32, False) is None and ob._trt_cache_root(fp32, "~/c") == Path.home() / "c"


def test_trt_cache_option_is_parsed_and_refused_by_the_torch_backend(tiny_model_dir):
    from prism_rt.cli import build_parser

    parse = lambda *extra: build_parser().parse_args(["info", "--model", "m", *extra]).trt_cache  # noqa: E731
    assert parse() is None and parse("--trt-cache", "off") is False and parse("--trt-cache", "/x/y") == Path("/x/y")
    with pytest.raises(BackendError, match="trt_cache.*onnxruntime"):
        Engine.load(tiny_model_dir, backend="torch", trt_cache="/x/y")


@pytest.mark.slow
def test_a_changed_variant_file_is_refused_only_when_that_variant_is_loaded(engine_dir, tmp_path):
    copy = Path(shutil.copytree(engine_dir, tmp_path / "engine"))
    data = copy / "onnx-int8-cpu" / "unet.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    load_manifest(copy, precision="fp16")  # other precisions are unaffected
    with pytest.raises(EngineMismatchError, match="onnx-int8-cpu/unet.onnx.data"):
        load_manifest(copy, precision="int8-cpu")


@pytest.mark.slow
def test_a_failed_variant_build_leaves_the_engine_as_it_was(engine_dir, tmp_path, calibration_dir, monkeypatch):
    from prism_export import variants

    copy = Path(shutil.copytree(engine_dir, tmp_path / "engine"))
    before = (copy / "manifest.json").read_bytes()
    listing = sorted(p.relative_to(copy) for p in copy.rglob("*"))

    def broken(*args, **kwargs):
        raise variants.VariantError("injected failure")

    monkeypatch.setattr(variants, "quantize_unet", broken)
    settings = variants.VariantSettings(calibration_images=calibration_dir, calibration_count=1, calibration_steps=2,
                                        calibration_samples=2, self_replace=(0.5,))
    with pytest.raises(variants.VariantError, match="injected"):
        variants.add_variants(copy, ["fp16", "int8"], settings, progress=lambda line: None)
    assert (copy / "manifest.json").read_bytes() == before
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == listing


def test_torch_backend_fp16_matches_fp32(tiny_model_dir, dicom_path):
    """The torch backend's fp16 graphs (the GPU path) against its fp32 ones; loops stay fp32."""
    from skimage.metrics import peak_signal_noise_ratio

    images = {}
    for precision in ("fp32", "fp16"):
        engine = Engine.load(tiny_model_dir, backend="torch", precision=precision)
        assert engine.backend.describe()["precision"] == precision
        inversion = engine.invert(dicom_path, "Chest X-ray showing Support Devices", method="direct",
                                  sampler=engine.sampler(steps=STEPS))
        result = engine.edit(inversion, ["Chest X-ray showing No Finding"], ControlConfig(self_replace=(0.6,)))
        assert result.edits[0].dtype == np.float32
        images[precision] = np.clip((result.edits[0].mean(0) + 1) / 2, 0, 1)
    assert peak_signal_noise_ratio(images["fp32"], images["fp16"], data_range=1.0) >= 30.0


# -- the benchmark suite, on this engine (its source checkpoint runs the torch rows) ----------------
def test_unet_layout_of_bench_batches():
    from prism_bench.suite import unet_layout

    # N = U + (1 + K): a direct-inversion call, one guided step, an edit step with K items
    assert [unet_layout(n) for n in (1, 2, 4, 12)] == [(0, 0), (1, 0), (2, 1), (6, 5)]


@pytest.mark.slow
def test_bench_writes_results_tables_plots_and_compares(engine_dir, tmp_path, capsys):
    from prism_rt.cli import main

    out = tmp_path / "bench"
    args = ["bench", "--model", str(engine_dir), "--out", str(out), "--steps", "3", "--repeats", "2", "--threads", "1"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "prism-rt-bench/1" and results["mode"] == "full"
    rows = results["rows"]
    graphs = {(r["backend"], r["precision"], r["graph"], r["batch"]) for r in rows if r["kind"] == "graph"}
    for config in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8"),
                   ("onnxruntime", "int8-cpu")):
        for graph in ("text_encoder", "vae_encoder", "vae_decoder", "unet"):
            assert {(*config, graph, b) for b in (1, 2, 4, 12)} <= graphs
    # on a CPU the fp32 engine also runs its portable graphs, beside the CPU twins it runs by default
    assert {("onnxruntime (portable graphs)", "fp32", "unet", b) for b in (1, 2, 4, 12)} <= graphs
    cf = {r["config"]: r for r in rows if r["kind"] == "counterfactual"}
    ref = next(r for r in cf.values() if r["role"] == "reference")
    assert ref["sweep"] == "sequential" and ref["inversion"] == "null-text" and ref["speedup_vs_reference"] == 1.0
    for row in cf.values():  # every configuration: its speed-up over the reference and its quality against it
        assert row["speedup_vs_reference"] == pytest.approx(ref["seconds_per_counterfactual"] / row["seconds_per_counterfactual"])
        assert row["quality_vs_reference"]["psnr_db_min"] > 0 and row["peak_rss_mb"] > 0
    # batching the sweep saves the source's repeated passes: fewer UNet items than value by value
    batched = next(r for r in cf.values() if r["inversion"] == "null-text" and r["sweep"] == "batched")
    assert batched["unet_items_per_counterfactual"] < ref["unet_items_per_counterfactual"]
    parts = {r["what"]: r["speedup"] for r in rows if r["kind"] == "decomposition"}
    total = next(r["speedup"] for r in rows if r["kind"] == "decomposition" and r["part"] == "total")
    assert parts["algorithm total (torch fp32)"] * parts["runtime total (direct, batched)"] == pytest.approx(total)
    assert [r for r in rows if r["kind"] == "throughput"][0]["counterfactuals_per_minute"] > 0
    text = (out / "results.md").read_text()
    assert "speed-up vs reference" in text and "## unet" in text
    for png in ("counterfactual_latency.png", "graph_latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(args[:4] + [str(tmp_path / "again"), "--mode", "graphs", "--repeats", "2", "--threads", "1",
                            "--compare", str(out / "results.json")]) == 0
    printed = capsys.readouterr().out
    assert "change against" in printed and "onnxruntime int8-cpu unet 12" in printed


@pytest.mark.slow
def test_bench_paired_times_each_precision_in_turn_against_torch_fp32(engine_dir, tmp_path, capsys):
    from prism_rt.cli import main

    out = tmp_path / "paired"
    args = ["bench", "--model", str(engine_dir), "--out", str(out), "--mode", "graphs", "--graphs", "unet",
            "--batches", "2", "--precisions", "fp32,int8-cpu", "--repeats", "3", "--threads", "1", "--paired"]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    paired = {(r["backend"], r["precision"]): r for r in rows if r["kind"] == "graph_paired"}
    assert set(paired) == {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8-cpu")}
    base = paired[("torch", "fp32")]["times_s"]
    for row in paired.values():
        assert row["graph"] == "unet" and row["batch"] == 2 and len(row["times_s"]) == 3
        assert row["median_s"] == pytest.approx(float(np.median(row["times_s"])))
        # each round's ratio, then their median: not a ratio of two medians
        assert row["ratio_to_torch_fp32"]["median"] == pytest.approx(
            float(np.median([a / b for a, b in zip(base, row["times_s"])])))
    assert paired[("torch", "fp32")]["rms_rel_diff_vs_torch_fp32"] == 0.0
    # the same inputs for every configuration: ONNX Runtime fp32 equals torch, int8-cpu differs by its noise
    assert paired[("onnxruntime", "fp32")]["rms_rel_diff_vs_torch_fp32"] < 1e-4
    assert 1e-3 < paired[("onnxruntime", "int8-cpu")]["rms_rel_diff_vs_torch_fp32"] < 0.5
    md = (out / "results.md").read_text()
    assert "## Paired" in md and "each in its own process" in md and "page faults / call" in md
    assert all(r["minor_faults_per_call"] >= 0 and r["system_s_per_call"] >= 0 for r in rows if "median_s" in r)
    # each configuration was served by a process of its own, not this one, and measured its own RSS
    pids = {row["pid"] for row in paired.values()}
    assert len(pids) == 3 and os.getpid() not in pids and all(r["process"] == "own" for r in paired.values())
    assert all(r["peak_rss_mb"] > 0 for r in paired.values())
    # the per-process rows are still there beside the paired ones
    assert {(r["backend"], r["precision"]) for r in rows if r["kind"] == "graph"} >= set(paired)


@pytest.mark.slow
def test_bench_paired_no_isolate_shares_this_process(engine_dir, tmp_path):
    from prism_rt.cli import main

    out = tmp_path / "paired"
    assert main(["bench", "--model", str(engine_dir), "--out", str(out), "--mode", "graphs", "--graphs", "unet",
                 "--batches", "1", "--precisions", "int8-cpu", "--repeats", "2", "--threads", "1", "--paired",
                 "--no-isolate"]) == 0
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["kind"] == "graph_paired"]
    assert [(r["backend"], r["precision"]) for r in rows] == [("torch", "fp32"), ("onnxruntime", "int8-cpu")]
    assert {r["pid"] for r in rows} == {os.getpid()} and {r["process"] for r in rows} == {"shared"}
    assert "all in one process" in (out / "results.md").read_text()
    assert 1e-3 < rows[1]["rms_rel_diff_vs_torch_fp32"] < 0.5


@pytest.mark.slow
def test_bench_paired_names_the_configuration_whose_process_failed(engine_dir, tiny_model_dir):
    """A configuration that cannot load raises a typed error naming it; the others' processes end."""
    import multiprocessing

    from prism_bench.suite import paired_worker
    from prism_rt.errors import PrismError

    job = {"precisions": ["int4"], "paths": {"checkpoint": str(tiny_model_dir), "engine": str(engine_dir)},
           "device": "cpu", "threads": 1, "batches": [1], "repeats": 1, "warmup": 1, "processes": True,
           "graphs": ["unet"]}
    with pytest.raises(PrismError, match="paired onnxruntime int4: .*int4"):
        paired_worker(job)
    assert multiprocessing.active_children() == []


def test_bench_counts_the_page_faults_and_kernel_time_of_a_call():
    """A call that writes a fresh 64 MiB buffer each time (freed after: glibc returns blocks that big
    to the system) faults at least once per page of it — 2 MiB pages at most (numpy asks for huge
    pages), 32 of them; a call that rewrites a kept buffer faults (nearly) never."""
    from prism_bench.suite import _call_measured, _timed

    kept = np.zeros(2**24, np.float32)
    kept.fill(1.0)
    fresh = _timed(lambda: np.ones(2**24, np.float32), warmup=1, repeats=3)
    reused = _timed(lambda: kept.fill(2.0), warmup=1, repeats=3)
    assert fresh["minor_faults_per_call"] >= 2**26 // 2**21 and reused["minor_faults_per_call"] <= 4
    assert fresh["system_s_per_call"] >= 0 and reused["repeats"] == 3
    seconds, (faults, system) = _call_measured(lambda: np.ones(2**24, np.float32))
    assert seconds > 0 and faults >= 2**26 // 2**21 and system >= 0


def test_bench_paired_is_refused_without_an_engine(tiny_model_dir, tmp_path, capsys):
    from prism_rt.cli import main

    code = main(["bench", "--model", str(tiny_model_dir), "--out", str(tmp_path / "b"), "--paired"])  # no --engine
    assert code == 2 and "--paired" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_bench_refuses_a_missing_compare_file(engine_dir, tmp_path, capsys):
    from prism_rt.cli import main

    code = main(["bench", "--model", str(engine_dir), "--out", str(tmp_path / "b"), "--compare", str(tmp_path / "no.json")])
    assert code == 2 and "--compare" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_nan_from_a_graph_is_a_typed_error_and_no_output(engine_dir, dicom_path, tmp_path, monkeypatch, capsys):
    """A variant that overflows (fp16 is the usual suspect) must never write a black image."""
    import prism_rt.ort_backend as ort_backend
    from prism_rt.cli import main

    real_run = ort_backend.OrtBackend.run

    def run(self, graph, **inputs):
        out = real_run(self, graph, **inputs)
        if graph == "vae_decoder":
            out["pixels"] = out["pixels"].copy()
            out["pixels"][0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(ort_backend.OrtBackend, "run", run)
    out = tmp_path / "out"
    code = main(["edit", "--model", str(engine_dir), "--backend", "onnxruntime", "--precision", "fp16",
                 "--inversion", "direct", "--image", str(dicom_path), "--prompt", "Chest X-ray showing Support Devices",
                 "--target", "Chest X-ray showing No Finding", "--steps", "2", "--self-replace", "0.5",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "vae_decoder" in err and err.startswith("error:")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
