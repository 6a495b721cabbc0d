"""benchmarks/int8_conv_floor.py emulates onnxruntime's QLinearConv; checked against onnxruntime itself."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _floor():
    spec = importlib.util.spec_from_file_location("int8_conv_floor", ROOT / "benchmarks" / "int8_conv_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _u8_params(t) -> tuple[float, int]:
    """The range int8-cpu's calibration gives a tensor (its min / max, 0 included), as u8 scale and zero point."""
    lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
    scale = np.float32((hi - lo) / 255)
    return scale, int(np.round(-lo / scale))


def test_the_floor_emulation_is_what_onnxruntimes_qlinearconv_computes(tmp_path):
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    floor = _floor()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 10, 10, generator=g) * 1.5 + 0.4  # an asymmetric range: the zero point matters
    w = torch.randn(6, 8, 3, 3, generator=g) * torch.linspace(0.05, 0.5, 6)[:, None, None, None]  # per-channel ranges
    emulated_x, emulated_w = floor.fake_quant_activation(x), floor.fake_quant_weight(w)
    y_float = torch.nn.functional.conv2d(emulated_x, emulated_w, padding=1)
    emulated = floor.fake_quant_activation(y_float).numpy()

    x_scale, x_zero = _u8_params(x)
    y_scale, y_zero = _u8_params(y_float)
    w_scale = (w.abs().amax(dim=(1, 2, 3)) / 127).numpy().astype(np.float32)
    w_int8 = np.clip(np.round(w.numpy() / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (np.array(x_scale, np.float32), "x_scale"), (np.array(x_zero, np.uint8), "x_zero"), (w_int8, "w"),
        (w_scale, "w_scale"), (np.zeros(6, np.int8), "w_zero"), (np.array(y_scale, np.float32), "y_scale"),
        (np.array(y_zero, np.uint8), "y_zero"))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"],
                              ["yq"], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["x_dq"])]
    graph = helper.make_graph(nodes, "qlinearconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("x_dq", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "qlinearconv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    y, x_dq = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y", "x_dq"], {"x": x.numpy()})

    assert np.allclose(x_dq, emulated_x.numpy(), rtol=0, atol=1e-6)  # the input: the same u8 grid and rounding
    # the output: onnxruntime requantizes the int32 accumulator with a float multiplier, so a value
    # that lands on a rounding boundary may go one step the other way
    steps = np.abs(y - emulated) / y_scale
    assert steps.max() <= 1.001 and np.mean(steps < 1e-3) > 0.99, (steps.max(), np.mean(steps < 1e-3))
    assert np.sqrt(np.mean((y - y_float.numpy()) ** 2)) > 0.1 * y_scale  # and it is not float: the grid is there
