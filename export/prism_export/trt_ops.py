"""The ONNX operators TensorRT's ONNX parser supports, to check exported graphs before a build.

Source: onnx-tensorrt ``docs/operators.md`` for **TensorRT 10.15** ("supports operators in the
inclusive range of opset 9 to opset 24"), the rows marked ``Y``, with their supported types.
Restrictions that matter for diffusion graphs are kept as notes. Checking the op set on the CPU
catches an unsupported op (e.g. one a new exporter version emits) at export time rather than on
the GPU machine at build time. Types are TensorRT's names: FP32, FP16, BF16, INT32, INT64, INT8,
UINT8, BOOL, FP8, FP4, INT4.
"""
from __future__ import annotations

TENSORRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)

_F = "FP32 FP16 BF16"
_FI = "FP32 FP16 BF16 INT32 INT64"
_FIB = "FP32 FP16 BF16 INT32 INT64 BOOL"
_TABLE = f"""
Abs {_FI}|Acos {_F}|Acosh {_F}|Add {_FI}|And BOOL|ArgMax {_FI}|ArgMin {_FI}|Asin {_F}|Asinh {_F}|Atan {_F}
Atanh {_F}|Attention {_F} INT8 FP8|AveragePool {_F}|BatchNormalization {_F}|BlackmanWindow FP32 FP16
Cast {_FIB} UINT8|CastLike {_FIB} UINT8|Ceil {_F}|Celu {_F}|Clip {_F}|Concat {_FIB}
Constant {_FIB} FP8 FP4 INT4|ConstantOfShape {_FIB} FP8 FP4 INT4|Conv {_F}|ConvTranspose {_F}|Cos {_F}|Cosh {_F}
CumSum {_F}|DeformConv FP32 FP16|DepthToSpace {_FI}|DequantizeLinear INT8 FP8 FP4 INT4|Div {_FI}|Dropout {_F}
Einsum {_F}|Elu {_F}|Equal {_FI}|Erf {_F}|Exp {_F}|Expand {_FIB}|EyeLike {_FIB}|Flatten {_FIB}|Floor {_F}
Gather {_FIB}|GatherElements {_FIB}|GatherND {_FIB}|Gelu {_FI} INT8|Gemm {_F}|GlobalAveragePool {_F}
GlobalLpPool {_F}|GlobalMaxPool {_F}|Greater {_FI}|GreaterOrEqual {_FI}|GridSample FP32 FP16
GroupNormalization {_F}|GRU {_F}|HammingWindow FP32 FP16|HannWindow FP32 FP16|HardSigmoid {_F}|HardSwish {_F}
Hardmax {_F}|Identity {_FIB}|If {_FIB}|ImageScaler {_F}|InstanceNormalization {_F}|IsInf {_F}|IsNaN {_FI}
LayerNormalization {_F}|LeakyRelu {_F}|Less {_FI}|LessOrEqual {_FI}|Log {_F}|LogSoftmax {_F}|Loop {_FIB}|LRN {_F}
LSTM {_F}|LpNormalization {_F}|LpPool {_F}|MatMul {_F}|Max {_FI}|MaxPool {_F}|Mean {_FI} FP8
MeanVarianceNormalization {_F}|Min {_FI}|Mish FP32 FP16|Mod {_FI}|Mul {_FI}|Neg {_FI}|NonMaxSuppression FP32 FP16
NonZero FP32 FP16|Not BOOL|OneHot {_FIB}|Or BOOL|Pad {_FI}|ParametricSoftplus {_F}|Pow {_FI}|PRelu {_F}
QuantizeLinear {_F}|RandomNormal {_F}|RandomNormalLike {_F}|RandomUniform {_F}|RandomUniformLike {_F}|Range {_FI}
Reciprocal {_F}|ReduceL1 {_FI}|ReduceL2 {_FI}|ReduceLogSum {_FI}|ReduceLogSumExp {_FI}|ReduceMax {_FI}
ReduceMean {_FI}|ReduceMin {_FI}|ReduceProd {_FI}|ReduceSum {_FI}|ReduceSumSquare {_FI}|Relu {_FI}
Reshape {_FIB}|Resize {_F}|ReverseSequence {_FIB}|RMSNormalization {_F}|RNN {_F}|RoiAlign FP32 FP16
RotaryEmbedding {_F}|Round {_F}|STFT FP32|ScaledTanh {_F}|Scan {_F}|Scatter {_FI}|ScatterElements {_FI}
ScatterND {_FI}|Selu {_F}|Shape {_FIB}|Shrink {_FI}|Sigmoid {_F}|Sign {_FI}|Sin {_F}|Sinh {_F}|Size {_FIB}
Slice {_FIB}|Softmax {_F}|Softplus {_F}|Softsign {_F}|SpaceToDepth {_FI}|Split {_FIB}|Sqrt {_F}|Squeeze {_FIB}
Sub {_FI}|Sum {_FI}|Tan {_F}|Tanh {_F}|TensorScatter {_F} INT32|ThresholdedRelu {_F}|Tile {_FIB}|TopK {_FI}
Transpose {_FIB}|Trilu {_FIB}|Unsqueeze {_FIB}|Upsample {_F}|Where {_FIB}|Xor BOOL
"""

SUPPORTED_OPS: dict[str, frozenset[str]] = {
    cell.split()[0]: frozenset(cell.split()[1:])
    for line in _TABLE.strip().splitlines() for cell in line.split("|") if cell.strip()
}

NOTES = {
    "Resize": "modes nearest/linear; coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, "
              "align_corners; no antialiasing",
    "Squeeze": "axes must be resolvable to constants",
    "Unsqueeze": "axes must be resolvable to constants",
    "ReduceMean": "axes must be an initializer",
    "ReduceSum": "axes must be an initializer",
    "ReduceMax": "axes must be an initializer",
    "LayerNormalization": "only the first output Y",
    "Dropout": "is_training must be a constant False",
    "TopK": "sorted must be 1; K < 3840",
    "CumSum": "axis must be a build-time constant",
}

# ops from the onnx standard domains; anything in another domain needs a TensorRT plugin
STANDARD_DOMAINS = ("", "ai.onnx")


def graph_ops(model) -> set[tuple[str, str]]:
    """(domain, op_type) of every node of an ``onnx.ModelProto``: main graph, subgraphs of
    If/Loop/Scan, and the bodies of model-local functions."""
    from onnx import AttributeProto

    found: set[tuple[str, str]] = set()

    def walk(nodes):
        for node in nodes:
            found.add((node.domain, node.op_type))
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    walk(attr.g.node)
                elif attr.type == AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g.node)

    walk(model.graph.node)
    for function in model.functions:
        walk(function.node)
    return found


def unsupported_ops(model) -> list[str]:
    """Ops of ``model`` TensorRT's parser cannot take: standard ops missing from the list, or
    nodes calling a function/domain that is neither defined in the model nor standard."""
    local = {(f.domain, f.name) for f in model.functions}
    bad = []
    for domain, op in sorted(graph_ops(model)):
        if (domain, op) in local:
            continue  # a model-local function: its body is walked too
        if domain not in STANDARD_DOMAINS or op not in SUPPORTED_OPS:
            bad.append(f"{domain or 'ai.onnx'}::{op}")
    return bad


def _trt_type_names() -> dict[int, str]:
    from onnx import TensorProto as T

    names = {T.FLOAT: "FP32", T.FLOAT16: "FP16", T.BFLOAT16: "BF16", T.INT32: "INT32", T.INT64: "INT64",
             T.INT8: "INT8", T.UINT8: "UINT8", T.BOOL: "BOOL", T.FLOAT8E4M3FN: "FP8", T.INT4: "INT4"}
    if hasattr(T, "FLOAT4E2M1"):
        names[T.FLOAT4E2M1] = "FP4"
    return names


_INT64_OUT = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}
_BOOL_OUT = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}


def tensor_types(model) -> dict[str, int]:
    """The ONNX element type of every tensor of ``model``'s main graph: inputs and initializers (no
    weights need to be loaded), then each node's outputs in graph order by the op's type rule (most
    ops: their first input's type), in dependency order. The graph's own ``value_info`` is not trusted: the fp16
    converter leaves stale entries."""
    from onnx import AttributeProto, TensorProto, helper

    from .onnx_graph import topological

    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in graph.input:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in topological(list(graph.node)):  # converters append their Casts at the end
        if node.domain not in STANDARD_DOMAINS:
            continue
        attrs = {a.name: a for a in node.attribute}
        first = types.get(node.input[0]) if node.input and node.input[0] else None
        op = node.op_type
        if op in _INT64_OUT:
            out = TensorProto.INT64
        elif op in _BOOL_OUT:
            out = TensorProto.BOOL
        elif op == "Cast":
            out = helper.get_attribute_value(attrs["to"])
        elif op == "CastLike":
            out = types.get(node.input[1])
        elif op == "QuantizeLinear":
            out = types.get(node.input[2]) if len(node.input) > 2 and node.input[2] else TensorProto.UINT8
        elif op == "DequantizeLinear":
            out = types.get(node.input[1])
        elif op in ("Constant", "ConstantOfShape"):
            value = attrs.get("value")
            out = value.t.data_type if value is not None and value.type == AttributeProto.TENSOR else TensorProto.FLOAT
        elif op == "Where":
            out = types.get(node.input[1])
        else:
            out = first
        for i, name in enumerate(node.output):
            if name and out is not None:
                types[name] = TensorProto.INT64 if op == "TopK" and i == 1 else out
    return types


def unsupported_types(model) -> list[str]:
    """Nodes of ``model``'s main graph whose data input (input 0, what the operator table's types
    are about) has a type TensorRT's parser does not take for that op, e.g. a DequantizeLinear of an
    int32 bias (onnx-tensorrt #850); and QuantizeLinear nodes that quantize to a type no
    DequantizeLinear takes (uint8: TensorRT's int8 is signed). Nodes of other domains (plugins)
    are :func:`unsupported_ops`' business and not judged here."""
    from onnx import TensorProto

    names, types = _trt_type_names(), tensor_types(model)
    bad = []
    for node in model.graph.node:
        allowed = SUPPORTED_OPS.get(node.op_type) if node.domain in STANDARD_DOMAINS else None
        if allowed is None or not node.input or not node.input[0]:
            continue
        elem = types.get(node.input[0])
        if elem is not None and names.get(elem) not in allowed:
            bad.append(f"{node.op_type} {node.name!r}: input {node.input[0]!r} is "
                       f"{TensorProto.DataType.Name(elem)}; TensorRT {TENSORRT_VERSION} takes {' '.join(sorted(allowed))}")
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in types:
            out = types[node.input[2]]
            if names.get(out) not in SUPPORTED_OPS["DequantizeLinear"]:
                bad.append(f"QuantizeLinear {node.name!r}: quantizes to {TensorProto.DataType.Name(out)}; TensorRT's "
                           f"DequantizeLinear takes {' '.join(sorted(SUPPORTED_OPS['DequantizeLinear']))}")
    return bad
