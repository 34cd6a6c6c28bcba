"""Writes models/affine.onnx: y = x * 2 + 1 over float32 tensors of shape [N, 4].

A deliberately tiny model for the agent's ONNX tests and the README example; run with
`python3 models/make_test_model.py` (needs the `onnx` package). The forecasting model gets its
own training script and data card with the forecasting issue.
"""
import onnx
from onnx import TensorProto, helper

two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
graph = helper.make_graph(
    [
        helper.make_node("Mul", ["x", "two"], ["doubled"]),
        helper.make_node("Add", ["doubled", "one"], ["y"]),
    ],
    "affine",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    initializer=[two, one],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, __file__.replace("make_test_model.py", "affine.onnx"))
