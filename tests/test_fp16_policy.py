"""fp16 variants keep normalisations / softmax in float32 only where the measured activations come
near fp16's range (prism_export.fp16_policy). Fast: graphs built here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _norm_net(path: Path, gain: float) -> Path:
    """x [1,4,8] → Mul(gain) → InstanceNormalization → Conv(1×1) → y, and a masked Softmax
    (Where(mask, x, float32 lowest) → Softmax → p) like an attention mask."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {"gain": np.array(gain, np.float32), "scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32),
              "w": rng.standard_normal((4, 4, 1)).astype(np.float32),
              "mask": np.tril(np.ones((8, 8), bool)), "lowest": np.array(np.finfo(np.float32).min, np.float32)}
    nodes = [helper.make_node("Mul", ["x", "gain"], ["h"]),
             helper.make_node("InstanceNormalization", ["h", "scale", "bias"], ["n"]),
             helper.make_node("Conv", ["n", "w"], ["y"]),
             helper.make_node("Where", ["mask", "s", "lowest"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1)]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", f, [1, 4, 8]),
                                              helper.make_tensor_value_info("s", f, [8, 8])],
                              [helper.make_tensor_value_info("y", f, [1, 4, 8]), helper.make_tensor_value_info("p", f, [8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
                    save_as_external_data=True, location=path.name + ".data", size_threshold=64)
    return path


def _feeds(n: int = 2) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 4, 8)).astype(np.float32), "s": rng.standard_normal((8, 8)).astype(np.float32)}
            for _ in range(n)]


CANDIDATES = ("InstanceNormalization", "Softmax")


@pytest.mark.parametrize("gain", [1.0, 300.0])
def test_the_largest_input_is_measured_without_the_mask_and_decides(tmp_path, gain):
    from prism_export.fp16_policy import OVERFLOW_MARGIN, fp32_ops_for

    feeds = _feeds()
    path = _norm_net(tmp_path / "norm.onnx", gain)
    # by hand: the InstanceNorm reads |gain·x|, the Softmax |s| where the mask keeps it (the rest is the mask value)
    mask = np.tril(np.ones((8, 8), bool))
    expected = max(max(np.abs(gain * f["x"]).max(), np.abs(f["s"][mask]).max()) for f in feeds)
    policy = fp32_ops_for(path, feeds, CANDIDATES)
    assert policy["largest_input"] == pytest.approx(expected, rel=1e-5)
    assert policy["fp32_ops"] == (list(CANDIDATES) if expected > OVERFLOW_MARGIN else [])
    assert (gain > 100) == bool(policy["fp32_ops"])
    assert not list(tmp_path.glob(".*")), "the measuring graph is removed"


def test_kept_ops_read_float32_and_the_rest_is_float16(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from prism_export.quantization import convert_fp16
    from prism_export.trt_ops import tensor_types, unsupported_ops, unsupported_types

    src = _norm_net(tmp_path / "norm.onnx", 300.0)
    for ops in ((), CANDIDATES):
        dst = tmp_path / ("kept" if ops else "all") / "norm.onnx"
        made = convert_fp16(src, dst, ops)
        assert made["fp32_ops"] == list(ops) and made["fp32_nodes"] == (2 if ops else 0)
        model = onnx.load(str(dst), load_external_data=False)
        types = tensor_types(model)
        for node in model.graph.node:
            if node.op_type in CANDIDATES:
                want = TensorProto.FLOAT if ops else TensorProto.FLOAT16
                assert types[node.input[0]] == want, (ops, node.op_type)
            if node.op_type == "Conv":
                assert types[node.input[1]] == TensorProto.FLOAT16  # weights fp16 either way
        assert unsupported_ops(model) == [] and unsupported_types(model) == []
        x = _feeds(1)[0]
        ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, x)
        got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, x)
        for r, g in zip(ref, got):
            assert g.dtype == np.float32 and np.abs(g - r).max() < 5e-3 * np.abs(r).max()


def test_unknown_fp32_ops_are_refused_with_the_fix():
    from prism_export.variant_config import VariantError, VariantSettings

    with pytest.raises(VariantError, match=r"--fp16-fp32-ops names \['GroupNorm'\].*LayerNormalization"):
        VariantSettings(fp16_fp32_ops=("GroupNorm",))
