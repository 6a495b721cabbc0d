"""What TensorRT is given, checked on the CPU: the int8 (TensorRT) Q/DQ layout and the operator /
type table on a tiny graph built here; the real engine's variant graphs are checked in
tests/test_variants.py. Fast: no export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

QUANTIZED = ("Conv", "MatMul", "Gemm")


def _small_net(path: Path) -> Path:
    """x [2,3,8,8] → Conv(+bias) → Relu → flatten → MatMul(w) → Add(b) → Gemm(+bias) → Softmax →
    y, and a MatMul of two activations (attention-like, never quantized): every place a bias or an
    output could get a Q/DQ it should not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {"conv_w": rng.standard_normal((4, 3, 3, 3)), "conv_b": rng.standard_normal(4),
              "shape": np.array([2, -1], np.int64), "mm_w": rng.standard_normal((256, 16)),
              "mm_b": rng.standard_normal(16), "gemm_w": rng.standard_normal((8, 16)), "gemm_b": rng.standard_normal(8)}
    consts = {k: v if v.dtype == np.int64 else (0.3 * v).astype(np.float32) for k, v in consts.items()}
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "mm_w"], ["m"], name="linear"),
             helper.make_node("Add", ["m", "mm_b"], ["mb"], name="linear_bias"),
             helper.make_node("Gemm", ["mb", "gemm_w", "gemm_b"], ["g"], name="gemm", transB=1),
             helper.make_node("Softmax", ["g"], ["y"], name="softmax", axis=-1),
             helper.make_node("Transpose", ["mb"], ["mbt"], name="transpose"),
             helper.make_node("MatMul", ["mb", "mbt"], ["scores"], name="scores")]  # two activations
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 2])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
                    save_as_external_data=True, location=path.name + ".data", size_threshold=64)
    return path


def _quantized(tmp_path: Path, precision: str) -> Path:
    from prism_export.quantization import quantize_unet

    src = _small_net(tmp_path / "small.onnx")
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32)} for i in range(3)]
    dst = tmp_path / precision / "small.onnx"
    quantize_unet(src, dst, feeds, precision, float_scopes=(), smoothing=None)
    return dst


def _types(model) -> dict[str, int]:
    from prism_export.trt_ops import tensor_types

    return tensor_types(model)


def test_int8_for_tensorrt_quantizes_only_weight_and_activation_inputs(tmp_path):
    """TensorRT's explicit-quantization pattern: each DequantizeLinear feeds input 0 (activation)
    or 1 (weight) of a Conv / MatMul / Gemm, reads int8 with zero point 0; biases stay float
    initializers; nothing is quantized after a quantized op; the product of two activations stays
    float. And the graph still computes the float graph's function to int8 accuracy."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper

    from prism_export.trt_ops import unsupported_ops, unsupported_types

    path = _quantized(tmp_path, "int8")
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    types = _types(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(dq) == 6 and len(q) == 3  # Conv, MatMul, Gemm: one activation and one weight each
    for node in dq:
        assert types[node.input[0]] == TensorProto.INT8, node.name  # never an int32 bias
        assert not numpy_helper.to_array(inits[node.input[2]]).any()  # symmetric: zero point 0
        for consumer, index in consumers[node.output[0]]:
            assert consumer.op_type in QUANTIZED and index in (0, 1), (node.name, consumer.name, index)
    for node in q:  # each Q feeds DQs only: no Q/DQ pair on an output feeding a float op
        assert {c.op_type for c, _ in consumers[node.output[0]]} == {"DequantizeLinear"}
        assert types[node.input[0]] == TensorProto.FLOAT
    quantized_outputs = {o for n in model.graph.node if n.op_type in QUANTIZED for o in n.output}
    assert not [n.name for n in q if n.input[0] in quantized_outputs and n.input[0] != "mb"], \
        "an output of a quantized op is requantized for a float consumer"
    nodes = {n.name: n for n in model.graph.node}
    assert inits[nodes["conv"].input[2]].data_type == TensorProto.FLOAT  # biases float
    assert inits[nodes["gemm"].input[2]].data_type == TensorProto.FLOAT
    assert not any(c.op_type == "DequantizeLinear" for c, _ in consumers.get("mm_b", []))
    assert set(nodes["scores"].input) == {"mb", "mbt"}  # the activation product was left alone
    assert unsupported_ops(model) == [] and unsupported_types(model) == []

    x = {"x": np.random.default_rng(9).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["y"], x)[0]  # noqa: E731
    ref, got = run(tmp_path / "small.onnx"), run(path)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_the_type_check_refuses_what_tensorrt_refuses(tmp_path):
    """The int8-cpu layout (int32 biases behind DequantizeLinear, uint8 activations) is what
    TensorRT's parser rejects: the checker names both, so the int8 check above can fail."""
    import onnx

    from prism_export.trt_ops import unsupported_types

    bad = unsupported_types(onnx.load(str(_quantized(tmp_path, "int8-cpu")), load_external_data=False))
    assert any(line.startswith("DequantizeLinear") and "INT32" in line for line in bad), bad
    assert any(line.startswith("QuantizeLinear") and "UINT8" in line for line in bad), bad
    assert any(line.startswith("DequantizeLinear") and "UINT8" in line for line in bad), bad


def test_the_type_check_reads_initializers_inputs_and_inferred_values(tmp_path):
    """A double-precision Cast chain: its input is a graph input, the Relu's an inferred value."""
    import onnx
    from onnx import TensorProto, helper

    from prism_export.trt_ops import unsupported_types

    nodes = [helper.make_node("Cast", ["x"], ["d"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])])
    bad = unsupported_types(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert len(bad) == 1 and bad[0].startswith("Relu 'relu'") and "DOUBLE" in bad[0], bad


@pytest.mark.parametrize("precision", ["int8", "int8-cpu"])
def test_quantize_refuses_fp32(tmp_path, precision):
    from prism_export.quantization import quantize_unet
    from prism_export.variant_config import VariantError

    with pytest.raises(VariantError, match="int8 or int8-cpu"):
        quantize_unet(tmp_path / "x.onnx", tmp_path / "y.onnx", [], "fp32")
