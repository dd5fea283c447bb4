"""ONNX and QONNX export of a packed model.

The packed model is first turned into a plain-ATen inference module (:func:`onnx_module`): each packed
binary conv becomes ``x (+ beta) -> [Pad] -> Sign(Sign(x) + 0.5) -> Conv(+-1 weights, zero pads) -> Mul ->
Add``. ONNX's ``Sign(0)`` is 0; ``Sign(Sign(x) + 0.5)`` maps 0 and -0.0 to +1, binarize's rule. Zero padding
is the Conv's own ``pads`` (a tap outside contributes 0, exactly as in ``ReCUConv2d``); the other padding
modes are an explicit ``Pad`` before the sign (the sign commutes with copying values). The scale and the
folded BatchNorm are the per-channel ``Mul`` and ``Add`` after the Conv. PyTorch's TorchScript-based
exporter writes it (``dynamo=False``: a few seconds where the dynamo exporter takes many times longer on
these models, and ``dynamic_axes`` gives the dynamic batch dimension), at opset 18 and IR version 8, which
onnxruntime >= 1.14 reads.

Then the graph is rewritten with the ``onnx`` package:

* ``format="onnx"``: each +-1 weight initializer is replaced by a packed uint8 initializer (bits along the
  input channels, LSB first, bit 1 = -1, ``[O, kh, kw, ceil(C/8), 1]``) and an unpacking subgraph
  (``BitShift``, ``BitwiseAnd``, ``Reshape``, ``Slice``, ``Cast``, ``Mul``, ``Add``, ``Transpose``) whose
  inputs are all constants, so onnxruntime folds it when the session starts and the file stays small.
* ``format="qonnx"``: each binary conv's weight goes through ``BipolarQuant(W, 1)`` and its input through
  ``BipolarQuant(x, 1)`` (domain ``qonnx.custom_op.general``; ``x >= 0 -> +1``), the form FINN and the
  QONNX tools consume. onnxruntime cannot run it; ``qonnx.core.onnx_exec.execute_onnx`` can.
"""

from __future__ import annotations

import io
import itertools
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from binarize._utils import default_example_inputs, replace_submodule, unwrap
from binarize.deploy import layer as _layer
from binarize.deploy.folding import _copy
from binarize.deploy.record import packed_meta
from binarize.errors import BinarizeError
from binarize.files import atomic_write

__all__ = ["IR_VERSION", "OPSET", "QONNX_DOMAIN", "OnnxBinaryConv2d", "export_onnx", "float_onnx", "onnx_module"]

OPSET = 18
"""The ONNX opset written (BitwiseAnd needs 18)."""

IR_VERSION = 8
"""The ONNX IR version of opset 18 (onnx 1.13); newer onnx packages write a higher one by default."""

QONNX_DOMAIN = "qonnx.custom_op.general"
_WEIGHT = "pm1_weight"
INPUT_NAME, OUTPUT_NAME = "input", "output"


class OnnxBinaryConv2d(nn.Module):
    """A packed binary conv as plain ATen ops, for the ONNX exporter (same outputs up to float rounding).

    Args:
        layer: The packed layer.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        out_channels = layer.out_channels
        self.register_buffer(_WEIGHT, _layer.plus_minus_one_weight(layer))
        self.register_buffer("mul", layer.mul.detach().float().reshape(1, out_channels, 1, 1).clone())
        self.register_buffer("add", layer.add.detach().float().reshape(1, out_channels, 1, 1).clone())
        beta = layer.activation_bias
        self.register_buffer("activation_bias", None if beta is None else beta.detach().float().view(1, -1, 1, 1))
        self.stride, self.dilation, self.groups = tuple(layer.stride), tuple(layer.dilation), layer.groups
        self.padding, self.padding_mode = tuple(layer.padding), layer.padding_mode

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_bias is not None:
            x = x + self.activation_bias
        padding = self.padding
        if self.padding_mode != "zeros" and padding != (0, 0):
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=self.padding_mode)
            padding = (0, 0)
        signs = torch.sign(torch.sign(x) + 0.5)
        out = F.conv2d(signs, getattr(self, _WEIGHT), None, self.stride, padding, self.dilation, self.groups)
        return out * self.mul + self.add


def onnx_module(packed: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of a packed model in plain ATen ops, and the names of its binary convs."""
    module = _copy(unwrap(packed))
    module.__dict__.pop("train", None)  # the packed model's refusal of .train(); the exporter calls train(False)
    names = []
    for name, layer in list(_layer.packed_layers(module)):
        replace_submodule(module, name, OnnxBinaryConv2d(layer))
        names.append(name)
    return module.eval(), names


def _torch_export(module: nn.Module, example: Tensor, dynamic_batch: bool) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
        )
    return buffer.getvalue()


def _weight_initializers(graph, names: Sequence[str]) -> dict[str, object]:
    """The +-1 weight initializer of each binary conv, by layer name."""
    by_name = {init.name: init for init in graph.initializer}
    found = {}
    for name in names:
        key = f"{name}.{_WEIGHT}"
        if key not in by_name:
            raise BinarizeError(f"the ONNX exporter renamed or folded the weights of {name}; cannot pack them")
        found[name] = by_name[key]
    return found


def _pack_weights(model, names: Sequence[str]) -> None:
    """Replaces each +-1 weight initializer by packed uint8 bits and a constant unpacking subgraph."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = _weight_initializers(graph, names)
    shared = [
        numpy_helper.from_array(np.arange(8, dtype=np.uint8), "binarize_bit_shifts"),
        numpy_helper.from_array(np.array(1, dtype=np.uint8), "binarize_bit_one"),
        numpy_helper.from_array(np.array(-2.0, dtype=np.float32), "binarize_minus_two"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "binarize_one"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "binarize_zero_index"),
        numpy_helper.from_array(np.array([3], dtype=np.int64), "binarize_channel_axis"),
    ]
    nodes = []
    for name, init in inits.items():
        weight = numpy_helper.to_array(init)  # [O, C, kh, kw] of +-1
        if not np.all(np.abs(weight) == 1):
            raise BinarizeError(f"the ONNX weights of {name} are not +-1; cannot pack them")
        o, c, kh, kw = weight.shape
        negative = (weight < 0).transpose(0, 2, 3, 1)  # OHWI
        bits = np.packbits(negative, axis=-1, bitorder="little")[..., None]  # [O, kh, kw, ceil(C/8), 1]
        w = init.name
        graph.initializer.remove(init)
        graph.initializer.extend(
            [
                numpy_helper.from_array(bits, f"{w}_bits"),
                numpy_helper.from_array(np.array([o, kh, kw, bits.shape[3] * 8], dtype=np.int64), f"{w}_bit_shape"),
                numpy_helper.from_array(np.array([c], dtype=np.int64), f"{w}_channels"),
            ]
        )
        nodes += [
            helper.make_node("BitShift", [f"{w}_bits", "binarize_bit_shifts"], [f"{w}_shifted"], direction="RIGHT"),
            helper.make_node("BitwiseAnd", [f"{w}_shifted", "binarize_bit_one"], [f"{w}_bit"]),
            helper.make_node("Reshape", [f"{w}_bit", f"{w}_bit_shape"], [f"{w}_bit_flat"]),
            helper.make_node(
                "Slice",
                [f"{w}_bit_flat", "binarize_zero_index", f"{w}_channels", "binarize_channel_axis"],
                [f"{w}_bit_ohwi"],
            ),
            helper.make_node("Cast", [f"{w}_bit_ohwi"], [f"{w}_bit_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{w}_bit_float", "binarize_minus_two"], [f"{w}_minus_two_bits"]),
            helper.make_node("Add", [f"{w}_minus_two_bits", "binarize_one"], [f"{w}_ohwi"]),
            helper.make_node("Transpose", [f"{w}_ohwi"], [w], perm=[0, 3, 1, 2]),
        ]
    if inits:
        graph.initializer.extend(shared)
    _prepend_nodes(graph, nodes)


def _prepend_nodes(graph, nodes: list) -> None:
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)


def _producers(graph) -> dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def _is_constant(graph, name: str, value: float, producers: dict) -> bool:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init).size == 1 and float(numpy_helper.to_array(init)) == value
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        array = numpy_helper.to_array(node.attribute[0].t)
        return array.size == 1 and float(array) == value
    return False


def _sign_input(graph, conv, producers: dict) -> tuple[object, str]:
    """For a binary conv's Conv node: the final ``Sign`` of ``Sign(Sign(x) + 0.5)`` and ``x``."""
    outer = producers.get(conv.input[0])
    if outer is not None and outer.op_type == "Sign":
        add = producers.get(outer.input[0])
        if add is not None and add.op_type == "Add":
            for i in (0, 1):
                inner = producers.get(add.input[i])
                half = _is_constant(graph, add.input[1 - i], 0.5, producers)
                if inner is not None and inner.op_type == "Sign" and half:
                    return outer, inner.input[0]
    raise BinarizeError(f"cannot find the sign in front of ONNX node {conv.name}; cannot write BipolarQuant")


def _remove_dead_nodes(graph) -> None:
    """Drops nodes whose outputs nothing uses (the sign chains BipolarQuant replaced)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _fold_constants(model) -> None:
    """Replaces every standard node whose inputs are all constants by initializers (one evaluation with
    onnx's reference evaluator): the exporter's padding arithmetic, which shape inference cannot see through."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    constant = {init.name for init in graph.initializer}
    folded = []
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and all(not i or i in constant for i in node.input):
            folded.append(node)
            constant.update(node.output)
    if not folded:
        return
    produced = {out for node in folded for out in node.output}
    needed = [i for node in graph.node if node not in folded for i in node.input if i in produced]
    needed += [out.name for out in graph.output if out.name in produced]
    needed = list(dict.fromkeys(needed))
    if not needed:
        return
    inputs = {i for node in folded for i in node.input}
    subgraph = helper.make_graph(
        folded,
        "constants",
        [],
        [helper.make_empty_tensor_value_info(name) for name in needed],
        [init for init in graph.initializer if init.name in inputs],
    )
    sub = helper.make_model(subgraph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    values = ReferenceEvaluator(sub).run(None, {})
    for node in folded:
        graph.node.remove(node)
    pairs = zip(needed, values, strict=True)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(value), name) for name, value in pairs)
    used = {i for node in graph.node for i in node.input} | {out.name for out in graph.output}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)


def _qonnx_tidy(model):
    """Constant folding and qonnx's shape inference: the QONNX tools expect every tensor's shape annotated."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.general import GiveUniqueNodeNames
    from qonnx.transformation.infer_shapes import InferShapes

    _fold_constants(model)
    return ModelWrapper(model).transform(InferShapes()).transform(GiveUniqueNodeNames()).model


def _to_qonnx(model, names: Sequence[str]) -> None:
    """Writes each binary conv's weight and input sign as ``BipolarQuant`` (QONNX)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = _weight_initializers(graph, names)
    weight_names = {init.name for init in inits.values()}
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), "binarize_bipolar_scale"))
    producers = _producers(graph)
    convs = [n for n in graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in weight_names]
    weight_quants, sign_nodes = [], {}
    for conv in convs:
        weight = conv.input[1]
        weight_quants.append(
            helper.make_node(
                "BipolarQuant",
                [weight, "binarize_bipolar_scale"],
                [f"{weight}_bipolar"],
                domain=QONNX_DOMAIN,
                name=f"{weight}_BipolarQuant",
            )
        )
        conv.input[1] = f"{weight}_bipolar"
        outer, x = _sign_input(graph, conv, producers)
        sign_nodes[outer.output[0]] = (outer, x)
    for out, (outer, x) in sign_nodes.items():
        quant = helper.make_node(
            "BipolarQuant", [x, "binarize_bipolar_scale"], [out], domain=QONNX_DOMAIN, name=f"{outer.name}_BipolarQuant"
        )
        index = list(graph.node).index(outer)
        graph.node.remove(outer)
        graph.node.insert(index, quant)
    _prepend_nodes(graph, weight_quants)
    _remove_dead_nodes(graph)
    model.opset_import.append(helper.make_opsetid(QONNX_DOMAIN, 1))


def export_onnx(
    packed: nn.Module,
    path: str | Path,
    *,
    qonnx: bool = False,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    force: bool = False,
) -> Path:
    """Writes a packed model as ONNX (or QONNX), checked with ``onnx.checker``.

    Args:
        packed: A model from :func:`binarize.deploy.pack` (or :func:`binarize.deploy.load_packed`).
        path: Destination ``.onnx`` file.
        qonnx: Write ``BipolarQuant`` nodes (QONNX) instead of packed weights (plain ONNX).
        example_inputs: One input tensor (or a one-tensor tuple) to trace with; by default zero images of the
            conversion's input size. The ONNX file has a dynamic batch dimension; the QONNX file has the static
            shape of the example (one image by default), as FINN's flow expects.
        force: Replace an existing file.

    Returns:
        The path written.
    """
    try:
        import onnx

        if qonnx:
            import qonnx as _qonnx  # noqa: F401
    except ImportError as err:
        what = "QONNX export needs the qonnx package" if qonnx else "ONNX export needs the onnx package"
        raise BinarizeError(f"{what}: pip install 'binarize[onnx]'") from err
    packed = unwrap(packed)
    if packed_meta(packed) is None:
        raise BinarizeError("export_onnx() takes a model returned by binarize.deploy.pack()")
    module, names = onnx_module(packed)
    if example_inputs is None:
        record = getattr(packed, "binarize_meta", None)
        example = default_example_inputs(module, record.input_size if record is not None else None)[0]
        example = example.expand(1 if qonnx else 2, *example.shape[1:]).contiguous()
    else:
        example = example_inputs if isinstance(example_inputs, Tensor) else example_inputs[0]
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    example = example.to(tensor.device if tensor is not None else "cpu")
    model = onnx.load_from_string(_torch_export(module, example, dynamic_batch=not qonnx))
    if qonnx:
        _to_qonnx(model, names)
        model = _qonnx_tidy(model)
    else:
        _pack_weights(model, names)
    model.ir_version = IR_VERSION
    model.producer_name = "binarize"
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), force=force)


def float_onnx(model: nn.Module, path: str | Path, example: Tensor, *, force: bool = False) -> Path:
    """Writes a float model as ONNX the same way (opset 18, IR 8, dynamic batch): the baseline a user compares with.

    Args:
        model: Any float model the TorchScript exporter takes.
        path: Destination ``.onnx`` file.
        example: An input to trace with.
        force: Replace an existing file.
    """
    import onnx

    was_training = model.training
    try:
        proto = onnx.load_from_string(_torch_export(model.eval(), example, dynamic_batch=True))
    finally:
        model.train(was_training)
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), force=force)
