"""Device-memory estimates (``prism-rt info ENGINE --memory``) against hand computations, and the
install check that names the onnxruntime / onnxruntime-gpu conflict. Fast: graphs built here and
the bundled engine's files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "engines" / "phantom-demo"


def _chain(value_info: bool = True):
    """x [batch,4] → a = Relu(x) → b = MatMul(a, W [4,8]) → c = Sigmoid(b) → y = Concat(a, c) [batch,12],
    float32; ``a`` lives until the Concat."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["c"]), helper.make_node("Concat", ["a", "c"], ["y"], axis=1)]
    infos = [helper.make_tensor_value_info(n, f, ["batch", w]) for n, w in (("a", 4), ("b", 8), ("c", 8))]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", f, ["batch", 4])],
                              [helper.make_tensor_value_info("y", f, ["batch", 12])],
                              [numpy_helper.from_array(np.ones((4, 8), np.float32), "W")],
                              value_info=infos if value_info else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_peak_activation_is_the_largest_sum_of_live_tensors():
    """By hand, in floats per item: x 4 → +a 8 (x freed: 4) → +b 12 → +c 20 (b freed: 12) →
    +y 24 (a, c freed). The peak, 24 floats × 4 bytes × batch, is at the Concat; the weight W is not
    an activation."""
    from prism_export.memory_profile import peak_activation_bytes

    for batch in (1, 3, 12):
        assert peak_activation_bytes(_chain(), {"batch": batch}) == (24 * 4 * batch, 1.0)
    # without the exporter's value_info, shape inference from the concrete input gives the same
    assert peak_activation_bytes(_chain(value_info=False), {"batch": 3}) == (24 * 4 * 3, 1.0)


def test_dim_expressions_of_the_exporter_evaluate_safely():
    from prism_export.memory_profile import eval_expr

    values = {"batch": 12, "groups": 1, "edits": 5}
    assert eval_expr("-groups*edits + groups*(edits + 1) - groups + batch", values) == 12
    assert eval_expr("((77*batch)//batch)", values) == 77
    assert eval_expr("unknown + 1", values) is None and eval_expr("__import__('os')", values) is None


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """The bundled engine with the activation record `prism-export memory` adds."""
    from prism_export.cli import main

    engine = tmp_path_factory.mktemp("memory") / "demo"
    shutil.copytree(DEMO, engine, ignore=shutil.ignore_patterns("images", "trt-cache"))
    assert main(["memory", "--engine", str(engine)]) == 0
    return engine


def test_info_memory_is_weights_plus_each_graphs_activations(recorded, capsys):
    """The estimate at a UNet batch: per graph its file bytes and the recorded line at its batch
    (text encoder 2 + K prompts, VAE one image), summed; the line passes through both measured
    points; a context shared between graphs needs only the largest activations."""
    from prism_export.memory_profile import peak_activation_bytes
    from prism_rt.cli import main

    import onnx

    assert main(["info", str(recorded), "--memory", "--batch", "24", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    raw = json.loads((recorded / "manifest.json").read_text())
    side = raw["model"]["latent_size"]
    batches = {"text_encoder": 2 + 5, "vae_encoder": 1, "vae_decoder": 1, "unet": 24}
    activations = {}
    for name, entry in raw["graphs"].items():
        row, memory = got["graphs"][name], entry["memory"]
        assert row["batch"] == batches[name] and row["weight_bytes"] == entry["bytes"]
        for point in memory["activation_points"]:  # the line goes through what was measured
            n = point["dims"]["batch"]
            assert abs(memory["activation_fixed_bytes"] + memory["activation_per_item_bytes"] * n - point["bytes"]) <= n
        activations[name] = row["activation_bytes"]
    model = onnx.load(str(recorded / "onnx" / "unet.onnx"), load_external_data=False)
    measured, _ = peak_activation_bytes(model, {"batch": 24, "groups": 1, "edits": 11})  # 24 = 2·(1 + 11)
    assert abs(activations["unet"] - measured) <= 0.01 * measured  # linear in the batch
    weights = sum(e["bytes"] for e in raw["graphs"].values())
    assert got["weight_bytes"] == weights and got["peak_bytes"] == weights + sum(activations.values())
    assert got["shared_context_bytes"] == weights + max(activations.values())
    assert main(["info", str(recorded), "--memory"]) == 0  # the manifest's deployment: 1 edit × 5 values
    text = capsys.readouterr().out
    assert "UNet batch 12" in text and "peak, onnxruntime TensorRT EP" in text
    assert side == 16


def test_info_memory_of_a_variant_reads_the_variant_graphs(recorded, capsys):
    from prism_rt.cli import main

    assert main(["info", str(recorded), "--memory", "--precision", "int8-cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    variant = json.loads((recorded / "manifest.json").read_text())["variants"]["int8-cpu"]["graphs"]["unet"]
    assert got["graphs"]["unet"]["precision"] == "int8-cpu" and got["graphs"]["unet"]["weight_bytes"] == variant["bytes"]


def test_an_engine_without_the_record_names_the_command_that_adds_it(tmp_path, capsys):
    """An engine exported before export recorded activations (the record removed from a copy)."""
    from prism_rt.cli import main

    engine = tmp_path / "demo"
    shutil.copytree(DEMO, engine, ignore=shutil.ignore_patterns("images", "trt-cache"))
    manifest = json.loads((engine / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        graph.pop("memory", None)
    (engine / "manifest.json").write_text(json.dumps(manifest))
    assert main(["info", str(engine), "--memory"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and "prism-export memory --engine" in err
    assert main(["info", "--model", "some/checkpoint.safetensors", "--memory"]) != 0  # no manifest to read
    assert "prism-export export" in capsys.readouterr().err


def test_install_check_names_the_onnxruntime_gpu_conflict(capsys):
    from prism_rt.cli import main
    from prism_rt.install_check import check_install

    both = {"onnxruntime": "1.23.2", "onnxruntime-gpu": "1.23.2"}
    report = check_install("cuda", distributions=both, providers=("AzureExecutionProvider", "CPUExecutionProvider"))
    lines = [line for line in report.lines() if line.startswith("error:")]
    assert any("#26996" in line and "pip uninstall -y onnxruntime onnxruntime-gpu" in line for line in lines), lines
    assert any("CUDAExecutionProvider" in line for line in lines)
    alone = check_install("tensorrt", distributions={"onnxruntime-gpu": "1.23.2"},
                          providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))
    assert alone.errors == ()
    # this machine: CPU onnxruntime only — fine for cpu, an error line naming the fix for cuda
    assert main(["check-install"]) == 0
    assert main(["check-install", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda needs onnxruntime's CUDAExecutionProvider") and "prism-rt[gpu]" in err
